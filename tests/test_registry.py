"""The backbone registry: every entry builds, reports its feature size and resolves its Grad-CAM layer."""

import pytest
import torch

from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.registry import BACKBONES, BackboneSpec, get_backbone_spec, list_backbones

PAPER_BACKBONES = ("mobilenet", "mobilenetv2", "densenet121", "vgg16", "nasnetmobile", "xception")
IMPLEMENTED = [name for name, spec in BACKBONES.items() if spec.implemented]


def test_registry_lists_paper_and_lite_backbones() -> None:
    names = list_backbones()
    for name in (*PAPER_BACKBONES, "efficientnet_lite0", "efficientnet_lite2"):
        assert name in names


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_backbone_features_match_registry(name: str) -> None:
    spec = get_backbone_spec(name)
    backbone = build_backbone(name, source="none")
    images = torch.rand(1, 3, 224, 224)

    with torch.no_grad():
        feature_map = backbone.feature_map(images)
        pooled = backbone(images)

    assert feature_map.shape[1] == spec.num_features
    assert pooled.shape == (1, spec.num_features)
    assert isinstance(backbone.target_layer(), torch.nn.Module)


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_target_layer_outputs_final_map(name: str) -> None:
    backbone = build_backbone(name, source="none")
    captured = {}
    handle = backbone.target_layer().register_forward_hook(lambda module, args, output: captured.update(out=output))
    images = torch.rand(1, 3, 224, 224)

    with torch.no_grad():
        feature_map = backbone.feature_map(images)
    handle.remove()

    assert captured["out"].shape[1] == feature_map.shape[1]
    # VGG16's last conv activation sits before the final max-pool, so its map is twice as large.
    assert captured["out"].shape[-1] in (feature_map.shape[-1], 2 * feature_map.shape[-1])


def test_flatten_pool_keeps_the_whole_map() -> None:
    backbone = build_backbone("mobilenet", source="none", pool="flatten")

    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 224, 224))

    assert features.shape == (2, 1024 * 7 * 7)


def test_unimplemented_backbone_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKBONES, "planned", BackboneSpec("planned", None, 512, None))

    with pytest.raises(NotImplementedError, match="'planned' is registered but not implemented yet"):
        get_backbone_spec("planned")


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'resnet9000'.*mobilenet"):
        get_backbone_spec("resnet9000")


def test_invalid_pool_names_choices() -> None:
    with pytest.raises(ValueError, match="Invalid pool mode 'max'.*avg, flatten"):
        build_backbone("mobilenet", source="none", pool="max")
