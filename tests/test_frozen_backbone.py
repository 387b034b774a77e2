"""Frozen means frozen: training steps change the head and nothing in the backbone."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.heads import MLPHead
from cbir_lightning.models.module import FrozenBackboneClassifier
from cbir_lightning.models.registry import BackboneSpec


def make_module(tiny_backbone: BackboneSpec) -> FrozenBackboneClassifier:
    backbone = build_backbone(tiny_backbone.name, source="none")
    head = MLPHead(tiny_backbone.num_features, num_classes=3)
    return FrozenBackboneClassifier(head, lambda params: torch.optim.Adam(params, lr=0.01), 3, backbone)


def image_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 64, 64, generator=generator)
    labels = torch.arange(24) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=generator)


def run_training_steps(module: FrozenBackboneClassifier, tmp_path) -> None:
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    # Lightning 2.6 keeps each submodule's mode at fit start; older releases called .train() on the
    # whole module, so the test does that too.
    module.train()
    trainer.fit(module, train_dataloaders=image_loader())


def test_backbone_state_unchanged_after_training(tiny_backbone: BackboneSpec, tmp_path) -> None:
    module = make_module(tiny_backbone)
    backbone_before = {name: value.clone() for name, value in module.backbone.state_dict().items()}
    head_before = {name: value.clone() for name, value in module.head.state_dict().items()}
    running_means = [name for name in backbone_before if name.endswith("running_mean")]

    run_training_steps(module, tmp_path)

    assert running_means, "the tiny backbone must contain BatchNorm layers for this test to mean anything"
    for name, value in module.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), f"backbone tensor {name} changed during training"
    assert any(not torch.equal(value, head_before[name]) for name, value in module.head.state_dict().items())


def test_backbone_stays_in_eval_mode(tiny_backbone: BackboneSpec) -> None:
    module = make_module(tiny_backbone)

    module.train()

    assert module.head.training
    assert not module.backbone.model.training
    assert all(not layer.training for layer in module.backbone.model.modules())


def test_backbone_has_no_trainable_parameters(tiny_backbone: BackboneSpec) -> None:
    module = make_module(tiny_backbone)

    assert all(not parameter.requires_grad for parameter in module.backbone.parameters())


def test_optimizer_gets_head_parameters_only(tiny_backbone: BackboneSpec) -> None:
    module = make_module(tiny_backbone)

    optimizer = module.configure_optimizers()
    optimized = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}

    assert optimized == {id(parameter) for parameter in module.head.parameters()}


def test_checkpoint_leaves_out_backbone(tiny_backbone: BackboneSpec) -> None:
    module = make_module(tiny_backbone)
    checkpoint = {"state_dict": module.state_dict()}

    module.on_save_checkpoint(checkpoint)

    assert checkpoint["state_dict"]
    assert all(name.startswith(("head.", "train_acc", "val_acc", "test_")) for name in checkpoint["state_dict"])
