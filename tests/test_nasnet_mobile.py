"""NASNet-A Mobile (timm ``nasnetamobile``): size, shapes, the timm model interface and the registry entry."""

import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.nasnet_mobile import NASNetAMobile
from cbir_lightning.models.registry import get_backbone_spec

# Keras' model.summary() counts the BatchNorm moving statistics as parameters; PyTorch keeps them as buffers.
KERAS_PARAMETERS_WITH_TOP = 5_326_716
KERAS_PARAMETERS_NO_TOP = 4_269_716
TORCH_PARAMETERS_WITH_TOP = 5_289_978


@pytest.fixture(scope="module")
def model() -> NASNetAMobile:
    return timm.create_model("nasnetamobile").eval()


def images(size: int = 224, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


def keras_parameter_count(network: nn.Module) -> int:
    statistics = sum(buffer.numel() for name, buffer in network.named_buffers() if name.endswith(("_mean", "_var")))
    return sum(parameter.numel() for parameter in network.parameters()) + statistics


def test_parameter_count_matches_keras(model: NASNetAMobile) -> None:
    assert sum(parameter.numel() for parameter in model.parameters()) == TORCH_PARAMETERS_WITH_TOP
    assert keras_parameter_count(model) == KERAS_PARAMETERS_WITH_TOP


def test_parameter_count_without_classifier() -> None:
    headless = timm.create_model("nasnetamobile", num_classes=0)

    assert keras_parameter_count(headless) == KERAS_PARAMETERS_NO_TOP


def test_forward_features_is_activated_map(model: NASNetAMobile) -> None:
    with torch.no_grad():
        feature_map = model.forward_features(images())

    assert feature_map.shape == (1, 1056, 7, 7)
    assert feature_map.min() >= 0


def test_num_features_is_1056(model: NASNetAMobile) -> None:
    assert model.num_features == 1056
    assert model.head_hidden_size == 1056


def test_forward_returns_logits(model: NASNetAMobile) -> None:
    with torch.no_grad():
        logits = model(images(batch=2))

    assert logits.shape == (2, 1000)


def test_forward_head_pre_logits(model: NASNetAMobile) -> None:
    feature_map = torch.rand(2, 1056, 7, 7)

    with torch.no_grad():
        pooled = model.forward_head(feature_map, pre_logits=True)

    assert torch.allclose(pooled, feature_map.mean(dim=(2, 3)))


def test_no_classifier_gives_pooled_features() -> None:
    headless = timm.create_model("nasnetamobile", num_classes=0).eval()

    with torch.no_grad():
        features = headless(images())

    assert features.shape == (1, 1056)
    assert isinstance(headless.get_classifier(), nn.Identity)


def test_no_pooling_gives_feature_map() -> None:
    headless = timm.create_model("nasnetamobile", num_classes=0, global_pool="").eval()

    with torch.no_grad():
        output = headless(images())

    assert output.shape == (1, 1056, 7, 7)


def test_reset_classifier_to_ten_classes() -> None:
    network = timm.create_model("nasnetamobile").eval()

    network.reset_classifier(10)
    with torch.no_grad():
        logits = network(images())

    assert logits.shape == (1, 10)
    assert network.get_classifier().out_features == 10
    assert network.num_classes == 10


def test_features_only_taps_five_levels() -> None:
    extractor = timm.create_model("nasnetamobile", features_only=True).eval()

    with torch.no_grad():
        features = extractor(images())

    assert extractor.feature_info.channels() == [32, 44, 264, 528, 1056]
    assert extractor.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert [tuple(feature.shape[1:]) for feature in features] == [
        (32, 111, 111),
        (44, 56, 56),
        (264, 28, 28),
        (528, 14, 14),
        (1056, 7, 7),
    ]


def test_odd_input_size_rounds_up(model: NASNetAMobile) -> None:
    with torch.no_grad():
        feature_map = model.forward_features(images(size=331))

    assert feature_map.shape == (1, 1056, 11, 11)


def test_pretrained_cfg_describes_keras_preprocessing(model: NASNetAMobile) -> None:
    config = model.pretrained_cfg

    assert config["input_size"] == (3, 224, 224)
    assert config["mean"] == (0.5, 0.5, 0.5)
    assert config["std"] == (0.5, 0.5, 0.5)
    assert config["crop_pct"] == 0.875
    assert config["interpolation"] == "bilinear"
    assert config["classifier"] == "classifier"
    assert not config.get("url")
    assert not config.get("hf_hub_id")


def test_batch_norm_uses_keras_settings(model: NASNetAMobile) -> None:
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]

    assert norms
    assert all(norm.eps == 1e-3 for norm in norms)
    assert all(norm.momentum == pytest.approx(3e-4) for norm in norms)


def test_invalid_num_features_raises() -> None:
    with pytest.raises(ValueError, match="num_features=1000 must be a multiple of 24"):
        NASNetAMobile(num_features=1000)


def test_registry_builds_nasnetmobile() -> None:
    spec = get_backbone_spec("nasnetmobile")
    backbone = build_backbone("nasnetmobile", source="none")
    captured = {}
    target = backbone.target_layer()
    target.register_forward_hook(lambda module, args, output: captured.update(out=output))

    with torch.no_grad():
        feature_map = backbone.feature_map(images())

    assert spec.timm_arch == "nasnetamobile"
    assert target is backbone.model.act_final
    assert isinstance(target, nn.ReLU)
    assert captured["out"].shape == (1, 1056, 7, 7)
    assert torch.equal(captured["out"], feature_map)


def test_package_import_stays_light() -> None:
    code = "import sys, cbir_lightning; print('torch' in sys.modules, 'timm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)

    assert result.stdout.split() == ["False", "False"]


def test_models_import_registers_timm_model() -> None:
    code = "import timm, cbir_lightning.models; print('nasnetamobile' in timm.list_models())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)

    assert result.stdout.strip() == "True"
