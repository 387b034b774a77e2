"""The LightningModule: a trainable head on top of a frozen backbone."""

import logging
from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cbir_lightning.evaluation.metrics import SUMMARY_METRICS, build_classification_metrics, split_results
from cbir_lightning.models.backbone import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = ["FrozenBackboneClassifier"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class FrozenBackboneClassifier(pl.LightningModule):
    """Train ``head`` on features of a frozen ``backbone`` with cross-entropy.

    A batch is ``(inputs, labels)``. Inputs of shape ``(batch, 3, H, W)`` are images and go through
    the backbone first; 2-D inputs are features already extracted by the same backbone (the feature
    cache serves those). Only the head's parameters reach the optimizer, and the backbone's weights
    are left out of checkpoints because the weight source can rebuild them.

    Logged keys: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and, per test run,
    ``test/acc``, ``test/precision_macro``, ``test/recall_macro`` and ``test/f1_macro``. The per-class
    scores and the confusion matrix of the last test run are in :attr:`test_tensors`.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        backbone: FrozenBackbone | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.num_classes = num_classes
        self.train_acc = build_classification_metrics(num_classes)["acc"].clone()
        self.val_acc = self.train_acc.clone()
        self.test_metrics = build_classification_metrics(num_classes)
        self.test_scalars: dict[str, float] = {}
        self.test_tensors: dict[str, torch.Tensor] = {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return class logits for images (4-D) or for precomputed features (2-D)."""
        return self.head(self._features(inputs))

    def _features(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim == 2:
            return inputs
        if self.backbone is None:
            raise ValueError(
                f"Got inputs of shape {tuple(inputs.shape)} but the module has no backbone: "
                f"pass features of shape (batch, dim) or build the module with a backbone."
            )
        with torch.no_grad():
            return self.backbone(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        inputs, labels = batch
        self.test_metrics.update(self(inputs), labels)

    def on_test_epoch_end(self) -> None:
        self.test_scalars, self.test_tensors = split_results(self.test_metrics.compute())
        for name in SUMMARY_METRICS:
            self.log(f"test/{name}", self.test_scalars[name])
        self.test_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.head.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            name: value for name, value in checkpoint["state_dict"].items() if not name.startswith("backbone.")
        }
