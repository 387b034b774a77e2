"""Tests for build_preprocessing in both modes, on small generated images and randomly initialised timm models."""

from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from torch import nn

from cbir_lightning.data.decode import load_rgb_image
from cbir_lightning.data.transforms import PREPROCESS_MODES, build_preprocessing

# Both models have mean = std = 0.5 in their pretrained configuration (timm 1.0.31).
MODEL_INPUT_SIZES = {"tf_efficientnet_lite2": 260, "mobilenetv1_100": 224}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: timm.create_model(name, pretrained=False) for name in MODEL_INPUT_SIZES}


def random_rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels_as_tensor(image: Image.Image) -> torch.Tensor:
    """Return the image's 8-bit pixels as a (channels, height, width) tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("model_name", MODEL_INPUT_SIZES)
def test_model_mode_input_size(models: dict[str, nn.Module], model_name: str) -> None:
    size = MODEL_INPUT_SIZES[model_name]

    preprocessing = build_preprocessing(models[model_name], "model")
    output = preprocessing.transform(random_rgb_image(90, 60))

    assert preprocessing.input_size == (3, size, size)
    assert tuple(output.shape) == (3, size, size)
    assert output.dtype == torch.float32


@pytest.mark.parametrize("model_name", MODEL_INPUT_SIZES)
@pytest.mark.parametrize("grey", [127, 128])
def test_model_mode_grey_normalised(models: dict[str, nn.Module], model_name: str, grey: int) -> None:
    model = models[model_name]
    config = timm.data.resolve_model_data_config(model)
    assert config["mean"] == (0.5, 0.5, 0.5)
    assert config["std"] == (0.5, 0.5, 0.5)
    expected = (grey / 255 - 0.5) / 0.5

    output = build_preprocessing(model, "model").transform(Image.new("RGB", (50, 70), (grey, grey, grey)))

    assert output.abs().max().item() < 0.005
    assert output.min().item() == pytest.approx(expected, abs=1e-6)
    assert output.max().item() == pytest.approx(expected, abs=1e-6)


def test_preprocess_id_per_model(models: dict[str, nn.Module]) -> None:
    efficientnet = models["tf_efficientnet_lite2"]
    mobilenet = models["mobilenetv1_100"]

    efficientnet_id = build_preprocessing(efficientnet, "model").preprocess_id
    mobilenet_id = build_preprocessing(mobilenet, "model").preprocess_id

    assert efficientnet_id != mobilenet_id
    assert build_preprocessing(efficientnet, "model").preprocess_id == efficientnet_id
    assert build_preprocessing(mobilenet, "model").preprocess_id == mobilenet_id
    assert build_preprocessing(mobilenet, "paper").preprocess_id != mobilenet_id


@pytest.mark.parametrize(
    "config_override",
    [
        {"input_size": (3, 256, 256)},
        {"interpolation": "bilinear"},
        {"crop_pct": 0.95},
        {"crop_mode": "squash"},
        {"mean": (0.485, 0.456, 0.406)},
        {"std": (0.229, 0.224, 0.225)},
    ],
    ids=lambda config_override: next(iter(config_override)),
)
def test_preprocess_id_tracks_config(models: dict[str, nn.Module], config_override: dict[str, object]) -> None:
    # The id is a feature cache key, so every config field that changes the output must change the id.
    image = random_rgb_image(90, 60)
    base = build_preprocessing(models["mobilenetv1_100"], "model")
    overridden_model = timm.create_model("mobilenetv1_100", pretrained=False, pretrained_cfg_overlay=config_override)

    overridden = build_preprocessing(overridden_model, "model")
    base_output = base.transform(image)
    overridden_output = overridden.transform(image)

    output_changed = overridden_output.shape != base_output.shape or not torch.equal(overridden_output, base_output)
    assert output_changed
    assert overridden.preprocess_id != base.preprocess_id


def test_paper_mode_ignores_model(models: dict[str, nn.Module]) -> None:
    efficientnet = build_preprocessing(models["tf_efficientnet_lite2"], "paper")
    mobilenet = build_preprocessing(models["mobilenetv1_100"], "paper")

    assert efficientnet.preprocess_id == mobilenet.preprocess_id
    assert efficientnet.input_size == (3, 224, 224)
    assert mobilenet.input_size == (3, 224, 224)


@pytest.mark.parametrize(("width", "height"), [(224, 224), (40, 30), (30, 500), (640, 480)])
def test_paper_mode_output_size(models: dict[str, nn.Module], width: int, height: int) -> None:
    preprocessing = build_preprocessing(models["mobilenetv1_100"], "paper")

    output = preprocessing.transform(random_rgb_image(width, height))

    assert tuple(output.shape) == (3, 224, 224)
    assert output.dtype == torch.float32
    assert output.min().item() >= 0.0
    assert output.max().item() <= 1.0


def test_paper_mode_divides_by_255(models: dict[str, nn.Module]) -> None:
    image = random_rgb_image(224, 224, seed=7)
    pixels = pixels_as_tensor(image)

    output = build_preprocessing(models["mobilenetv1_100"], "paper").transform(image)

    # torchvision 0.29's ToDtype multiplies by the float32 value of 1 / 255, so some values differ from a true
    # division by one float32 step (about 6e-8 below 1.0). Scaling back and rounding checks the resize exactly.
    torch.testing.assert_close(output, pixels / 255, rtol=0, atol=1e-7)
    assert torch.equal((output * 255).round().to(torch.uint8), pixels)


def test_paper_mode_no_normalisation(models: dict[str, nn.Module]) -> None:
    grey = 127

    output = build_preprocessing(models["mobilenetv1_100"], "paper").transform(
        Image.new("RGB", (50, 70), (grey, grey, grey))
    )

    assert output.min().item() == pytest.approx(grey / 255, abs=1e-6)
    assert output.max().item() == pytest.approx(grey / 255, abs=1e-6)


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_grayscale_png_equal_channels(models: dict[str, nn.Module], tmp_path: Path, mode: str) -> None:
    # A diagonal ramp that contains every 8-bit level, so that the channels have many different values to compare.
    columns = np.arange(224, dtype=np.uint16)
    rows = np.arange(224, dtype=np.uint16)[:, None]
    levels = ((columns + rows) % 256).astype(np.uint8)
    stored = Image.fromarray(levels)
    path = tmp_path / "grey.png"
    stored.save(path)

    image = load_rgb_image(path)
    output = build_preprocessing(models["mobilenetv1_100"], mode).transform(image)

    assert stored.mode == "L"
    assert image.mode == "RGB"
    assert output.shape[0] == 3
    assert torch.equal(output[0], output[1])
    assert torch.equal(output[0], output[2])
    assert output[0].unique().numel() > 100


def test_grayscale_png_paper_values(models: dict[str, nn.Module], tmp_path: Path) -> None:
    levels = np.random.default_rng(3).integers(0, 256, size=(224, 224), dtype=np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(levels).save(path)

    output = build_preprocessing(models["mobilenetv1_100"], "paper").transform(load_rgb_image(path))

    torch.testing.assert_close(output[0], torch.from_numpy(levels) / 255, rtol=0, atol=1e-7)


def test_invalid_mode_raises(models: dict[str, nn.Module]) -> None:
    with pytest.raises(ValueError, match="Invalid preprocess") as error_info:
        build_preprocessing(models["mobilenetv1_100"], "imagenet")  # type: ignore[arg-type]

    message = str(error_info.value)
    assert "'imagenet'" in message
    assert "model" in message
    assert "paper" in message
