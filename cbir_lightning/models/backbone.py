"""A frozen timm feature extractor: no gradients, BatchNorm always in eval mode."""

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from cbir_lightning.models.registry import BackboneSpec, get_backbone_spec
from cbir_lightning.models.weights.sources import load_model

log = logging.getLogger(__name__)

__all__ = ["POOL_MODES", "FrozenBackbone", "build_backbone"]

PoolMode = Literal["avg", "flatten"]
POOL_MODES: tuple[str, ...] = ("avg", "flatten")


class FrozenBackbone(nn.Module):
    """Wrap a timm model as a frozen extractor of pooled or flattened features.

    ``forward`` returns ``(batch, num_features)`` for ``pool="avg"`` (global average pooling) and
    ``(batch, C * H * W)`` for ``pool="flatten"`` (the un-pooled map, flattened as the classic
    Keras transfer-learning heads do).

    The wrapped model stays in eval mode even when Lightning calls ``.train()`` on the parent module,
    so BatchNorm running statistics never change and dropout never fires.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, weights_id: str, pool: PoolMode = "avg") -> None:
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"Invalid pool mode {pool!r}. Choose one of: {', '.join(POOL_MODES)}.")
        model.reset_classifier(0, "")
        self.model = model
        self.spec = spec
        self.weights_id = weights_id
        self.pool = pool
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Keep the wrapped model in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Return the un-pooled final feature map, ``(batch, C, H, W)``."""
        return self.model.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return pooled (``avg``) or flattened (``flatten``) features, one row per image."""
        feature_map = self.feature_map(images)
        if self.pool == "avg":
            return feature_map.mean(dim=(2, 3))
        return feature_map.flatten(1)

    def target_layer(self) -> nn.Module:
        """Return the last conv activation layer, for Grad-CAM."""
        if self.spec.target_layer is None:
            raise NotImplementedError(f"Backbone {self.spec.name!r} has no registered target layer.")
        return self.model.get_submodule(self.spec.target_layer)


def build_backbone(
    name: str,
    source: str = "auto",
    path: str | None = None,
    pool: PoolMode = "avg",
    init_seed: int = 0,
    cache_dir: Path | None = None,
) -> FrozenBackbone:
    """Build a registered backbone with its weights and freeze it.

    Raises:
        ValueError: unknown backbone name or pool mode.
        NotImplementedError: the backbone is registered but not implemented yet.
        WeightsUnavailableError: the weights cannot be obtained from ``source``.
    """
    spec = get_backbone_spec(name)
    loaded = load_model(spec, source, path, init_seed, cache_dir)
    log.info("Backbone %s (%s) with weights %s", name, spec.timm_arch, loaded.weights_id)
    return FrozenBackbone(loaded.model, spec, loaded.weights_id, pool)
