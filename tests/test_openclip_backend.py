"""The openclip backend offline: a tiny registered CLIP architecture with random weights saved to a file.

The tiny model proves that loading, indexing, text and image queries and ranking run. Its rankings
carry no meaning, so quality needs real CLIP weights (see ``test_real_clip_ranks_colours``).
"""

import json
import logging
import os
from pathlib import Path

import open_clip
import pytest
import torch

from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.models.weights import sources
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.retrieval.embed import build_embedder
from cbir_lightning.retrieval.index import GalleryIndex
from cbir_lightning.text_search.clip import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    load_clip_model,
    load_clip_search_space,
)
from cbir_lightning.text_search.query import embed_text, rank_scores

TINY_CLIP = "tiny-clip-test"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
REAL_CLIP_ENV = "CBIR_CLIP_PRETRAINED"


def write_tiny_clip(folder: Path) -> tuple[Path, Path]:
    """Write the tiny model config and a checkpoint of its seeded random weights; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_CLIP)
    checkpoint = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny CLIP model config and checkpoint, written once per session."""
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test off the network: the Hugging Face client is offline and every host unreachable."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_is_reachable", lambda host, port=443: False)


@pytest.fixture
def clip_space(tiny_clip: tuple[Path, Path], tmp_path: Path):
    config, checkpoint = tiny_clip
    return load_clip_search_space(
        TINY_CLIP, str(checkpoint), tmp_path / "cache", model_config=config, show_progress=False
    )


def test_checkpoint_file_loads_with_its_transform(clip_space, tiny_clip: tuple[Path, Path]) -> None:
    clip = clip_space.clip

    assert clip.weights_id.startswith("file:")
    assert len(clip.weights_id) == len("file:") + 16
    assert clip.context_length == 16
    assert clip.preprocessing.input_size == (3, 32, 32)
    assert "size=32,32" in clip.preprocessing.preprocess_id
    key = clip_space.embedder.key
    assert key.backbone == f"openclip:{TINY_CLIP}"
    assert key.weights_id == clip.weights_id
    assert key.pool == "clip"
    assert "open_clip" in key.code_version


def test_text_embeddings_are_unit_length(clip_space) -> None:
    embeddings = clip_space.encode_texts(["a photo of a horse", "a beach", "snow"])

    assert embeddings.shape == (3, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_long_query_is_truncated_with_warning(clip_space, caplog: pytest.LogCaptureFixture) -> None:
    long_text = " ".join(["horse"] * 40)

    with caplog.at_level(logging.WARNING, logger="cbir_lightning.text_search.clip"):
        embedding = clip_space.encode_texts([long_text])

    assert embedding.shape == (1, 16)
    assert "truncated" in caplog.text
    assert "at most 16" in caplog.text


def test_short_query_gives_no_warning(clip_space, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cbir_lightning.text_search.clip"):
        clip_space.encode_texts(["a horse"])

    assert "truncated" not in caplog.text


def test_index_reuses_cached_clip_vectors(clip_space, image_folder: Path, tmp_path: Path) -> None:
    first = GalleryIndex.build(image_folder, clip_space.embedder, tmp_path / "index", show_progress=False)
    second = GalleryIndex.build(image_folder, clip_space.embedder, tmp_path / "index", show_progress=False)

    assert first.embeddings.shape == (30, 16)
    assert first.changes.embedded == 30
    assert second.changes.embedded == 0
    assert torch.equal(first.embeddings, second.embeddings)
    assert first.manifest.backbone == f"openclip:{TINY_CLIP}"


def test_clip_index_rejects_cnn_embedder(
    clip_space, image_folder: Path, tmp_path: Path, tiny_backbone: BackboneSpec
) -> None:
    index = GalleryIndex.build(image_folder, clip_space.embedder, tmp_path / "index", show_progress=False)
    cnn = build_embedder("tiny", "none", cache_dir=tmp_path / "cache", show_progress=False)

    with pytest.raises(ValueError, match="another embedding configuration"):
        index.check_embedder(cnn)


def test_image_query_finds_itself(clip_space, image_folder: Path, tmp_path: Path) -> None:
    index = GalleryIndex.build(image_folder, clip_space.embedder, tmp_path / "index", show_progress=False)
    gallery = clip_space.gallery_matrix(index.embeddings)
    row = 17

    query = clip_space.encode_image_file(index.paths[row])
    scores, rows = rank_scores(clip_space.score(query, gallery), 3)

    assert int(rows[0]) == row
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-5)


def test_text_query_scores_are_cosines(clip_space, image_folder: Path, tmp_path: Path) -> None:
    index = GalleryIndex.build(image_folder, clip_space.embedder, tmp_path / "index", show_progress=False)
    gallery = clip_space.gallery_matrix(index.embeddings)

    query = embed_text(clip_space, "a horse", ["a photo of {}.", "a drawing of {}."])
    scores = clip_space.score(query, gallery)

    expected = torch.nn.functional.cosine_similarity(index.embeddings, query[None], dim=1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_unreachable_tag_names_concepts_backend() -> None:
    with pytest.raises(WeightsUnavailableError) as raised:
        load_clip_model(DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED)

    message = str(raised.value)
    assert "not reachable" in message
    assert "backend=concepts" in message


def test_missing_checkpoint_names_concepts_backend(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as raised:
        load_clip_model(DEFAULT_CLIP_MODEL, str(tmp_path / "missing.pt"))

    message = str(raised.value)
    assert "neither an open_clip tag" in message
    assert DEFAULT_CLIP_PRETRAINED in message
    assert "backend=concepts" in message


def test_checkpoint_of_other_model_is_rejected(tiny_clip: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = tiny_clip
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(2, 2)}, wrong)

    with pytest.raises(WeightsUnavailableError, match="Cannot load CLIP checkpoint"):
        load_clip_model(TINY_CLIP, str(wrong), model_config=config)


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        load_clip_model("no-such-clip", DEFAULT_CLIP_PRETRAINED)


def test_empty_pretrained_is_rejected(tiny_clip: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="clip.pretrained is empty"):
        load_clip_model(TINY_CLIP, "", model_config=tiny_clip[0])


def test_invalid_model_config_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "not-a-clip.json"
    config.write_text(json.dumps({"layers": 2}))

    with pytest.raises(ValueError, match="embed_dim, vision_cfg and text_cfg"):
        load_clip_model("not-a-clip", DEFAULT_CLIP_PRETRAINED, model_config=config)


def _real_clip_checkpoint() -> str | None:
    """Return a local ViT-B-32 CLIP checkpoint from $CBIR_CLIP_PRETRAINED or the hub cache, else None."""
    configured = os.environ.get(REAL_CLIP_ENV)
    if configured and Path(configured).is_file():
        return configured
    from huggingface_hub import try_to_load_from_cache

    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", filename)
        if isinstance(cached, str):
            return cached
    return None


@pytest.mark.weights
def test_real_clip_ranks_colours(image_folder: Path, tmp_path: Path) -> None:
    checkpoint = _real_clip_checkpoint()
    if checkpoint is None:
        pytest.skip(
            f"No CLIP weights on this machine: set {REAL_CLIP_ENV}=<ViT-B-32 checkpoint> or cache "
            f"{DEFAULT_CLIP_MODEL} {DEFAULT_CLIP_PRETRAINED} with a machine that reaches the hub."
        )
    space = load_clip_search_space(DEFAULT_CLIP_MODEL, checkpoint, tmp_path / "cache", show_progress=False)
    index = GalleryIndex.build(image_folder, space.embedder, tmp_path / "index", show_progress=False)
    gallery = space.gallery_matrix(index.embeddings)

    for text, folder in (("a red square", "cats"), ("a green square", "dogs"), ("a blue square", "owls")):
        _, rows = rank_scores(space.score(embed_text(space, text), gallery), 5)
        classes = [index.image_class_names[row] for row in rows.tolist()]
        assert classes == [folder] * 5, text
