"""Fast CPU inference: channels_last memory format and bfloat16 autocast, and their feature cache keys."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cbir_lightning.data.folder import scan_image_folder
from cbir_lightning.data.transforms import build_preprocessing
from cbir_lightning.features.cache import FeatureCache, FeatureKey
from cbir_lightning.features.inference import autocast_context, iterate_features, prepare_for_inference
from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.registry import BackboneSpec


@pytest.fixture
def setup(image_folder: Path, tiny_backbone: BackboneSpec):
    backbone = build_backbone(tiny_backbone.name, source="none")
    preprocessing = build_preprocessing(backbone.model, "model")
    # Two images of each of the three classes.
    records = scan_image_folder(image_folder, show_progress=False).records[::5]
    return backbone, preprocessing, records


def _features(setup, channels_last: bool, precision: str = "fp32") -> torch.Tensor:
    backbone, preprocessing, records = setup
    paths = [record.path for record in records]
    batches = iterate_features(
        paths, backbone, preprocessing, batch_size=4, channels_last=channels_last, precision=precision
    )
    return torch.cat(list(batches))


def test_channels_last_matches_nchw(setup) -> None:
    nchw = _features(setup, channels_last=False)
    channels_last = _features(setup, channels_last=True)

    assert len(nchw) == 6
    assert channels_last.dtype == torch.float32
    torch.testing.assert_close(channels_last, nchw, atol=1e-4, rtol=0)


def test_channels_last_keeps_rankings(setup) -> None:
    nchw = F.normalize(_features(setup, channels_last=False), dim=1)
    channels_last = F.normalize(_features(setup, channels_last=True), dim=1)

    nchw_ranking = torch.argsort(nchw @ nchw.T, dim=1, descending=True, stable=True)
    channels_last_ranking = torch.argsort(channels_last @ channels_last.T, dim=1, descending=True, stable=True)

    assert torch.equal(channels_last_ranking, nchw_ranking)


def test_bf16_features_are_close_to_fp32(setup) -> None:
    fp32 = _features(setup, channels_last=True)
    bf16 = _features(setup, channels_last=True, precision="bf16")

    assert bf16.dtype == torch.float32
    assert bf16.shape == fp32.shape
    # bfloat16 keeps 8 significant bits, so the cosine similarity stays close to 1 but the values differ.
    assert float(F.cosine_similarity(bf16, fp32).min()) > 0.99
    assert not torch.equal(bf16, fp32)


def test_prepare_switches_memory_format(setup) -> None:
    backbone, _, _ = setup
    weight = next(parameter for parameter in backbone.parameters() if parameter.ndim == 4)

    prepare_for_inference(backbone, channels_last=True)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    assert not backbone.training

    prepare_for_inference(backbone, channels_last=False)
    assert weight.is_contiguous()


def test_autocast_context_per_precision() -> None:
    matrix = torch.ones(2, 2)

    with autocast_context("fp32", "cpu"):
        assert (matrix @ matrix).dtype == torch.float32
    with autocast_context("bf16", "cpu"):
        assert (matrix @ matrix).dtype == torch.bfloat16


def test_invalid_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="Invalid precision 'fp16'"):
        FeatureKey("tiny", "none:seed0", "model", "avg", precision="fp16")
    with pytest.raises(ValueError, match="Invalid precision 'int8'"):
        autocast_context("int8", "cpu")


def test_bf16_key_differs_from_fp32() -> None:
    fp32 = FeatureKey("tiny", "none:seed0", "model", "avg")
    bf16 = FeatureKey("tiny", "none:seed0", "model", "avg", precision="bf16")

    assert fp32.precision == "fp32"
    assert bf16.digest() != fp32.digest()
    assert FeatureCache("cache", bf16).directory != FeatureCache("cache", fp32).directory


def test_fp32_key_digest_is_unchanged() -> None:
    key = FeatureKey("tiny", "none:seed0", "model", "avg")
    # The digest of the key fields that existed before the precision field.
    fields = {name: value for name, value in asdict(key).items() if name != "precision"}
    expected = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    assert key.digest() == expected


def test_extract_stores_bf16_apart(setup, tmp_path: Path) -> None:
    backbone, preprocessing, records = setup
    fp32_key = FeatureKey("tiny", backbone.weights_id, preprocessing.preprocess_id, backbone.pool)
    bf16_key = FeatureKey("tiny", backbone.weights_id, preprocessing.preprocess_id, backbone.pool, precision="bf16")

    fp32 = FeatureCache(tmp_path, fp32_key).extract(records, backbone, preprocessing, show_progress=False)
    bf16_cache = FeatureCache(tmp_path, bf16_key)
    bf16 = bf16_cache.extract(records, backbone, preprocessing, show_progress=False)

    assert bf16_cache.stats.computed == len(records)
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, _features(setup, channels_last=True, precision="bf16"))


def test_extract_rejects_other_precision(setup, tmp_path: Path) -> None:
    backbone, preprocessing, records = setup
    key = FeatureKey("tiny", backbone.weights_id, preprocessing.preprocess_id, backbone.pool)

    with pytest.raises(ValueError, match="Invalid precision='bf16'"):
        FeatureCache(tmp_path, key).extract(records, backbone, preprocessing, show_progress=False, precision="bf16")
