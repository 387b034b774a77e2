"""Shared fixtures: tiny generated image folders, a tiny registered backbone and a composed train config.

The tiny backbone is timm's ``test_efficientnet`` (99 k parameters) with random weights, so mechanism
tests run offline in seconds.
"""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from cbir_lightning.models.registry import BACKBONES, BackboneSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
COREL_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "corel-1k"
TINY_BACKBONE = BackboneSpec("tiny", "test_efficientnet", 256, "bn2")
# One colour per class, so that even a random backbone separates the classes.
CLASS_COLOURS = {"cats": (200, 40, 40), "dogs": (40, 200, 40), "owls": (40, 40, 200)}


def write_class_images(root: Path, per_class: int = 10, size: tuple[int, int] = (48, 40)) -> Path:
    """Write ``per_class`` noisy JPEGs for each class colour under ``root/<class>/``."""
    rng = np.random.default_rng(0)
    for class_name, colour in CLASS_COLOURS.items():
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=95)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of ten small JPEGs."""
    return write_class_images(tmp_path / "images")


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> BackboneSpec:
    """Register the tiny backbone as ``backbone.name=tiny`` for the duration of a test."""
    monkeypatch.setitem(BACKBONES, TINY_BACKBONE.name, TINY_BACKBONE)
    return TINY_BACKBONE


def compose_train_config(overrides: list[str]) -> DictConfig:
    """Compose ``conf/train.yaml`` with Hydra's compose API, as the command line would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def tiny_train_overrides(tmp_path: Path, image_folder: Path, tiny_backbone: BackboneSpec) -> list[str]:
    """Overrides for a fast offline training run of the tiny random backbone on the generated folder."""
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={image_folder}",
        "data.show_progress=false",
        "data.batch_size=8",
        "backbone.name=tiny",
        "weights.source=none",
        f"features.cache_dir={tmp_path / 'cache'}",
        "features.num_workers=0",
        "features.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu",
        "logger=csv",
    ]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra's compose API, as the command line would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
