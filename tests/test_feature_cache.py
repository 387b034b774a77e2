"""The feature cache: each image goes through the backbone once per backbone configuration."""

from pathlib import Path

import pytest
import torch

from cbir_lightning.data.decode import load_rgb_image
from cbir_lightning.data.folder import scan_image_folder
from cbir_lightning.data.transforms import build_preprocessing
from cbir_lightning.features.cache import FeatureCache, FeatureKey
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.models.registry import BackboneSpec


class ForwardCounter:
    """Count the images that pass through a backbone's forward."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.images = 0
        backbone.register_forward_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self.images += len(args[0])


@pytest.fixture
def setup(image_folder: Path, tiny_backbone: BackboneSpec, tmp_path: Path):
    backbone = build_backbone(tiny_backbone.name, source="none")
    preprocessing = build_preprocessing(backbone.model, "model")
    records = scan_image_folder(image_folder, show_progress=False).records
    key = FeatureKey(tiny_backbone.name, backbone.weights_id, preprocessing.preprocess_id, backbone.pool)
    return backbone, preprocessing, records, key, tmp_path / "cache"


def test_second_extraction_skips_backbone(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    counter = ForwardCounter(backbone)

    first = FeatureCache(cache_dir, key).extract(records, backbone, preprocessing, show_progress=False)
    images_after_first = counter.images
    cache = FeatureCache(cache_dir, key)
    second = cache.extract(records, backbone, preprocessing, show_progress=False)

    assert images_after_first == len(records)
    assert counter.images == images_after_first
    assert cache.stats.computed == 0
    assert cache.stats.cached == len(records)
    assert torch.equal(first, second)


def test_cached_features_match_direct_forward(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    features = FeatureCache(cache_dir, key).extract(records[:4], backbone, preprocessing, show_progress=False)

    images = torch.stack([preprocessing.transform(load_rgb_image(record.path)) for record in records[:4]])
    with torch.inference_mode():
        expected = backbone(images)

    torch.testing.assert_close(features, expected)


def test_new_images_are_the_only_ones_computed(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    FeatureCache(cache_dir, key).extract(records[:10], backbone, preprocessing, show_progress=False)
    counter = ForwardCounter(backbone)

    cache = FeatureCache(cache_dir, key)
    cache.extract(records, backbone, preprocessing, show_progress=False)

    assert counter.images == len(records) - 10
    assert cache.stats.computed == len(records) - 10


def test_other_key_is_computed_again(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    FeatureCache(cache_dir, key).extract(records, backbone, preprocessing, show_progress=False)
    counter = ForwardCounter(backbone)
    other_key = FeatureKey(key.backbone, "none:seed1", key.preprocess_id, key.pool)

    FeatureCache(cache_dir, other_key).extract(records, backbone, preprocessing, show_progress=False)

    assert counter.images == len(records)


def test_duplicate_content_is_computed_once(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    counter = ForwardCounter(backbone)

    features = FeatureCache(cache_dir, key).extract(
        [records[0], records[1], records[0]], backbone, preprocessing, show_progress=False
    )

    assert counter.images == 2
    assert torch.equal(features[0], features[2])


def test_cache_leaves_no_temporary_files(setup) -> None:
    backbone, preprocessing, records, key, cache_dir = setup
    cache = FeatureCache(cache_dir, key)

    cache.extract(records, backbone, preprocessing, show_progress=False)

    stored = list(cache.directory.rglob("*.safetensors"))
    assert len(stored) == len(records)
    assert not list(cache.directory.rglob("*.tmp"))
    assert (cache.directory / "key.json").is_file()
