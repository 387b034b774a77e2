"""Image preprocessing: the backbone's own pretrained configuration, or a plain resize with pixels divided by 255."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import timm.data
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

log = logging.getLogger(__name__)

__all__ = ["PREPROCESS_MODES", "Preprocessing", "build_preprocessing"]

PreprocessMode = Literal["model", "paper"]
PREPROCESS_MODES: tuple[str, ...] = ("model", "paper")
PAPER_SIZE = 224  # preprocess=paper resizes every image to 224 x 224, whatever the backbone


@dataclass(frozen=True)
class Preprocessing:
    """A transform from an upright RGB PIL image to a float tensor, and an id for cache keys."""

    transform: Callable[[Image.Image], torch.Tensor]
    preprocess_id: str  # changes whenever the transform's output would change
    input_size: tuple[int, int, int]  # (channels, height, width) of the output
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # subtracted after scaling pixels to [0, 1]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # divides after the mean is subtracted

    @property
    def mode(self) -> str:
        """The ``PreprocessMode`` that built this transform, which every ``preprocess_id`` starts with."""
        return self.preprocess_id.split(":", 1)[0]


def build_preprocessing(model: nn.Module, mode: PreprocessMode = "model") -> Preprocessing:
    """Build the evaluation transform for ``model``.

    ``model`` reads input size, interpolation, crop and mean/std from the model's pretrained
    configuration (timm's ``resolve_model_data_config``). ``paper`` resizes to 224 x 224 and divides
    the pixel values by 255, nothing else.
    """
    if mode == "model":
        return _model_preprocessing(model)
    if mode == "paper":
        return _paper_preprocessing()
    raise ValueError(f"Invalid preprocess={mode!r}. Choose one of: {', '.join(PREPROCESS_MODES)}.")


def _model_preprocessing(model: nn.Module) -> Preprocessing:
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    parts = [
        "model",
        "x".join(str(size) for size in config["input_size"]),
        str(config["interpolation"]),
        f"crop{config['crop_pct']}",
        str(config.get("crop_mode", "center")),
        "mean" + ",".join(f"{value:.6g}" for value in config["mean"]),
        "std" + ",".join(f"{value:.6g}" for value in config["std"]),
    ]
    log.info("Preprocessing from the model's pretrained configuration: %s", config)
    return Preprocessing(
        transform, ":".join(parts), tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"])
    )


def _paper_preprocessing() -> Preprocessing:
    # NOTE: Keras' image loaders resize with nearest-neighbour by default; bilinear is used here.
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((PAPER_SIZE, PAPER_SIZE), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return Preprocessing(transform, f"paper:{PAPER_SIZE}x{PAPER_SIZE}:bilinear:div255", (3, PAPER_SIZE, PAPER_SIZE))
