"""Keras HDF5 reading and the file source's .h5 path, without TensorFlow (tests/test_keras_equivalence.py has
the comparisons with Keras itself)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from torch import nn

from cbir_lightning.models.registry import BackboneSpec, get_backbone_spec
from cbir_lightning.models.weights import keras_h5
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.keras_h5 import (
    KerasWeightsError,
    create_model_from_keras_h5,
    prepare_xception_for_keras,
    read_keras_h5,
)
from cbir_lightning.models.weights.sources import load_model

KERNEL = np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4)
GAMMA, BETA, MEAN, VARIANCE = (np.full(4, value, dtype=np.float32) for value in (1.5, 0.1, 0.2, 2.0))

# The inverse of each layout conversion in keras_h5, to write Keras files from a PyTorch model.
TO_KERAS = {
    keras_h5._conv_kernel: lambda tensor: tensor.permute(2, 3, 1, 0),
    keras_h5._depthwise_kernel: lambda tensor: tensor.permute(2, 3, 0, 1),
    keras_h5._dense_kernel: lambda tensor: tensor.t(),
    keras_h5._unchanged: lambda tensor: tensor,
}


def write_legacy_layers(group: h5py.Group, layers: dict[str, dict[str, np.ndarray]], suffix: str = ":0") -> None:
    """Write ``layers`` as Keras 2's save_weights does: ``<layer>/<layer>/<variable>:0`` and name attributes."""
    group.attrs["layer_names"] = [name.encode("utf8") for name in ["input_1", *layers]]
    group.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
    for layer, variables in layers.items():
        layer_group = group.create_group(layer)
        weight_names = [f"{layer}/{variable}{suffix}" for variable in variables]
        layer_group.attrs["weight_names"] = [name.encode("utf8") for name in weight_names]
        for weight_name, value in zip(weight_names, variables.values(), strict=True):
            layer_group.create_dataset(weight_name, data=value)


def small_layers() -> dict[str, dict[str, np.ndarray]]:
    return {
        "c1": {"kernel": KERNEL},
        "bn": {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN, "moving_variance": VARIANCE},
    }


def assert_small_layers(weights: dict[str, dict[str, np.ndarray]]) -> None:
    assert np.array_equal(weights["c1"]["kernel"], KERNEL)
    assert list(weights["bn"]) == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert np.array_equal(weights["bn"]["moving_variance"], VARIANCE)


def test_reader_legacy_weights_layout(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as file:
        write_legacy_layers(file, small_layers())

    weights = read_keras_h5(path)

    assert_small_layers(weights)
    assert weights["input_1"] == {}


def test_reader_full_model_layout(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as file:
        write_legacy_layers(file.create_group("model_weights"), small_layers(), suffix="")

    assert_small_layers(read_keras_h5(path))


def test_reader_keras3_weights_layout(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as file:
        conv = file.create_group("layers/conv2d_3/vars")
        conv.attrs["name"] = "c1"
        conv.create_dataset("0", data=KERNEL)
        norm = file.create_group("layers/batch_normalization/vars")
        norm.attrs["name"] = "bn"
        for index, value in enumerate((GAMMA, BETA, MEAN, VARIANCE)):
            norm.create_dataset(str(index), data=value)
        file.create_group("layers/activation/vars").attrs["name"] = "relu"

    weights = read_keras_h5(path)

    assert_small_layers(weights)
    assert "relu" not in weights


def test_reader_rejects_hdf5_without_keras_weights(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("data", data=np.zeros(3))

    with pytest.raises(KerasWeightsError, match="HDF5 file without Keras weights"):
        read_keras_h5(path)


def write_nasnet_mobile_file(path: Path, model: nn.Module, include_top: bool) -> None:
    """Write ``model``'s weights in the layout of Keras' NASNet-mobile.h5, through the converter's name table."""
    sources = keras_h5._nasnet_mobile_sources(model)
    if include_top:
        sources |= keras_h5._dense("classifier", "predictions")
    state = model.state_dict()
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, (layer, variable, convert) in sources.items():
        layers.setdefault(layer, {})[variable] = TO_KERAS[convert](state[key]).contiguous().numpy()
    with h5py.File(path, "w") as file:
        write_legacy_layers(file, layers)


def test_nasnet_mobile_file_source_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("nasnetamobile")
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_mean, -0.5, 0.5)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
    path = tmp_path / "NASNet-mobile.h5"
    write_nasnet_mobile_file(path, reference, include_top=True)

    loaded = load_model(get_backbone_spec("nasnetmobile"), "file", str(path))

    assert loaded.weights_id.startswith("file:")
    assert loaded.source == "file"
    loaded_state = loaded.model.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded_state[key], tensor), key


def test_no_top_file_keeps_random_classifier(tmp_path: Path) -> None:
    reference = timm.create_model("nasnetamobile", num_classes=0)
    path = tmp_path / "NASNet-mobile-no-top.h5"
    write_nasnet_mobile_file(path, reference, include_top=False)

    model = create_model_from_keras_h5("nasnetamobile", path)

    assert torch.equal(model.stem_conv.weight, reference.stem_conv.weight)
    assert model.get_classifier().out_features == 1000


def test_file_of_other_architecture_names_missing_layer(tmp_path: Path) -> None:
    path = tmp_path / "xception.h5"
    with h5py.File(path, "w") as file:
        write_legacy_layers(file, {"block1_conv1": {"kernel": np.zeros((3, 3, 3, 32), dtype=np.float32)}})

    with pytest.raises(KerasWeightsError, match="Keras layer 'stem_conv1'.*block1_conv1"):
        create_model_from_keras_h5("nasnetamobile", path)


def test_file_source_rejects_h5_for_other_backbones(tmp_path: Path, tiny_backbone: BackboneSpec) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"HDF")

    with pytest.raises(WeightsUnavailableError, match="supported only for nasnetmobile and xception"):
        load_model(tiny_backbone, "file", str(path))


def test_file_source_reports_unreadable_h5(tmp_path: Path) -> None:
    path = tmp_path / "NASNet-mobile.h5"
    path.write_bytes(b"not an HDF5 file")

    with pytest.raises(WeightsUnavailableError, match="cannot load Keras weights from .*NASNet-mobile.h5"):
        load_model(get_backbone_spec("nasnetmobile"), "file", str(path))


def test_prepare_xception_sets_keras_eps_and_padding() -> None:
    model = timm.create_model("legacy_xception", num_classes=0).eval()
    keys_before = list(model.state_dict())

    prepare_xception_for_keras(model)

    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    pools = [module for module in model.modules() if isinstance(module, nn.MaxPool2d)]
    assert all(norm.eps == 1e-3 for norm in norms)
    assert len(pools) == 4
    assert all(type(pool).__name__ == "MaxPool2dSame" for pool in pools)
    assert list(model.state_dict()) == keys_before
    with torch.no_grad():
        assert model.forward_features(torch.rand(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
