"""The query-by-image command end to end on a tiny generated folder, and its errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.retrieve import retrieve
from cbir_lightning.train import train
from tests.conftest import compose_config


@pytest.fixture
def overrides(tmp_path: Path, image_folder: Path, tiny_backbone: BackboneSpec) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        f"index.root={image_folder}",
        f"index.dir={tmp_path / 'index'}",
        "index.show_progress=false",
        "backbone.name=tiny",
        "weights.source=none",
        f"features.cache_dir={tmp_path / 'cache'}",
        "features.num_workers=0",
        "k=5",
    ]


def test_retrieve_writes_three_outputs(overrides: list[str], tmp_path: Path) -> None:
    report = retrieve(compose_config("retrieve", overrides))

    run_dir = tmp_path / "run"
    stored = json.loads((run_dir / "retrieval.json").read_text())
    assert stored == report
    assert (run_dir / "retrieval.png").is_file()
    html = (run_dir / "retrieval.html").read_text()
    assert html.count("<figure>") == 6
    assert "data:image/jpeg;base64," in html
    assert 'src="/' not in html


def test_results_are_ranked_and_labelled(overrides: list[str]) -> None:
    report = retrieve(compose_config("retrieve", overrides))

    results = report["results"]
    assert [item["rank"] for item in results] == [1, 2, 3, 4, 5]
    similarities = [item["similarity"] for item in results]
    assert similarities == sorted(similarities, reverse=True)
    assert all(item["class"] in {"cats", "dogs", "owls"} for item in results)
    assert report["gallery"]["size"] == 21


def test_random_query_is_excluded(overrides: list[str]) -> None:
    report = retrieve(compose_config("retrieve", [*overrides, "k=100"]))

    paths = [item["path"] for item in report["results"]]
    assert report["query"]["path"] not in paths
    assert len(paths) == 20


def test_query_file_in_gallery_is_excluded(overrides: list[str], image_folder: Path) -> None:
    query = image_folder / "owls" / "3.jpg"

    report = retrieve(compose_config("retrieve", [*overrides, f"query={query}", "index.split=all"]))

    paths = [item["path"] for item in report["results"]]
    assert report["query"]["class"] == "owls"
    assert str(query.resolve()) not in paths
    assert len(paths) == 5
    assert report["results"][0]["class"] == "owls"


def test_outside_query_keeps_every_result(overrides: list[str], tmp_path: Path) -> None:
    query = tmp_path / "outside.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(query)

    report = retrieve(compose_config("retrieve", [*overrides, f"query={query}", "k=100"]))

    assert report["query"]["class"] is None
    assert report["results"][0]["class"] == "cats"
    assert len(report["results"]) == report["gallery"]["size"] == 21


def test_euclidean_reports_distances(overrides: list[str]) -> None:
    report = retrieve(compose_config("retrieve", [*overrides, "metric=euclidean"]))

    distances = [item["distance"] for item in report["results"]]
    assert distances == sorted(distances)
    assert report["score"] == "distance"


def test_second_run_reuses_index(overrides: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    retrieve(compose_config("retrieve", overrides))

    with caplog.at_level("INFO"):
        retrieve(compose_config("retrieve", [*overrides, f"output_dir={tmp_path / 'second'}", "seed=3"]))

    assert "is up to date" in caplog.text


def test_bf16_features_refused_by_fp32_index(overrides: list[str]) -> None:
    retrieve(compose_config("retrieve", overrides))

    with pytest.raises(ValueError, match="precision='fp32' in the index but 'bf16'.*index.rebuild=true"):
        retrieve(compose_config("retrieve", [*overrides, "features.precision=bf16"]))


def test_rebuild_replaces_other_precision(overrides: list[str]) -> None:
    retrieve(compose_config("retrieve", overrides))

    report = retrieve(compose_config("retrieve", [*overrides, "features.precision=bf16", "index.rebuild=true"]))

    assert len(report["results"]) == 5


def test_scan_false_keeps_index(overrides: list[str], image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = retrieve(compose_config("retrieve", [*overrides, "index.split=all"]))
    shutil.copy(image_folder / "cats" / "0.jpg", image_folder / "cats" / "copy.jpg")

    with caplog.at_level("INFO"):
        unscanned = retrieve(compose_config("retrieve", [*overrides, "index.split=all", "index.scan=false"]))
    updated = retrieve(compose_config("retrieve", [*overrides, "index.split=all"]))

    assert "without scanning" in caplog.text
    assert unscanned["gallery"]["size"] == first["gallery"]["size"] == 30
    assert updated["gallery"]["size"] == 31


def test_empty_split_names_fix(overrides: list[str]) -> None:
    options = [*overrides, "index.split=val", "index.fractions=[0.98,0.01,0.01]"]

    with pytest.raises(ValueError, match="index.split=val selects no image.*index.split=all"):
        retrieve(compose_config("retrieve", options))


def test_faiss_options_need_faiss_backend(overrides: list[str]) -> None:
    pytest.importorskip("faiss")
    options = ["backend_options.index_type=hnsw"]

    with pytest.raises(ValueError, match="backend=faiss"):
        retrieve(compose_config("retrieve", [*overrides, *options]))
    report = retrieve(compose_config("retrieve", [*overrides, *options, "backend=faiss"]))
    ivf = retrieve(
        compose_config("retrieve", [*overrides, "backend=faiss", "backend_options={index_type: ivf, nlist: 2}"])
    )

    assert len(report["results"]) == 5
    assert report["settings"]["backend_options"]["index_type"] == "hnsw"
    assert ivf["settings"]["backend_options"]["nlist"] == 2
    assert [item["path"] for item in ivf["results"]] == [item["path"] for item in report["results"]]


def test_excluded_count_follows_setting(overrides: list[str]) -> None:
    report = retrieve(compose_config("retrieve", [*overrides, "exclude_query=false", "k=100"]))

    assert report["settings"]["excluded"] == 0
    assert report["settings"]["backend"] == "exact"
    assert len(report["results"]) == report["gallery"]["size"]


def test_scan_false_warns_about_other_root(
    overrides: list[str], image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    retrieve(compose_config("retrieve", overrides))
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)

    with caplog.at_level("WARNING"):
        report = retrieve(compose_config("retrieve", [*overrides, f"index.root={other}", "index.scan=false"]))

    assert f"was built from {image_folder.resolve()}, not from {other.resolve()}" in caplog.text
    assert report["gallery"]["root"] == str(image_folder.resolve())


@pytest.mark.parametrize(
    ("option", "message"), [("metric=foo", "metric='foo'"), ("backend=bar", "backend='bar'"), ("k=0", "k=0")]
)
def test_bad_search_option_fails_before_indexing(
    overrides: list[str], tmp_path: Path, option: str, message: str
) -> None:
    with pytest.raises(ValueError, match=f"Invalid {message}"):
        retrieve(compose_config("retrieve", [*overrides, option]))

    assert not (tmp_path / "index").exists()


def test_large_k_warns_and_returns_gallery(overrides: list[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        report = retrieve(compose_config("retrieve", [*overrides, "k=50"]))

    assert "k=50 is larger than the 20 gallery images" in caplog.text
    assert len(report["results"]) == 20
    assert report["settings"]["excluded"] == 1


def test_missing_query_names_path(overrides: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"

    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        retrieve(compose_config("retrieve", [*overrides, f"query={missing}"]))


def test_folder_query_named(overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        retrieve(compose_config("retrieve", [*overrides, f"query={tmp_path}"]))


def test_non_image_query_names_path(overrides: list[str], tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")

    with pytest.raises(ValueError, match="notes.jpg.*not a usable image"):
        retrieve(compose_config("retrieve", [*overrides, f"query={text}"]))


def test_invalid_split_names_choices(overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="Invalid index.split='holdout'.*train, val, test, all"):
        retrieve(compose_config("retrieve", [*overrides, "index.split=holdout"]))


def test_similarity_explanation_writes_maps(overrides: list[str], tmp_path: Path) -> None:
    report = retrieve(compose_config("retrieve", [*overrides, "explain=similarity", "k=3"]))

    maps_dir = tmp_path / "run" / "maps"
    results = np.load(maps_dir / "similarity_results.npy")
    query = np.load(maps_dir / "similarity_query.npy")
    html = (tmp_path / "run" / "retrieval.html").read_text()
    assert results.shape == (3, 160, 160)
    assert query.shape == (3, 160, 160)
    assert float(results.min()) >= 0.0
    assert float(results.max()) <= 1.0
    assert not (maps_dir / "class_maps.npy").exists()
    assert len(report["results"]) == 3
    assert html.count('data-view="similarity"') == 4
    assert html.count('data-view="query region"') == 3


def test_class_explanation_needs_head(overrides: list[str]) -> None:
    with pytest.raises(FileNotFoundError, match="head_checkpoint=<its run folder>"):
        retrieve(compose_config("retrieve", [*overrides, "explain=class"]))


def test_both_explanations_with_trained_head(overrides: list[str], tmp_path: Path, image_folder: Path) -> None:
    train_overrides = [
        f"output_dir={tmp_path / 'train'}",
        f"data.root={image_folder}",
        "data.show_progress=false",
        "backbone.name=tiny",
        "weights.source=none",
        f"features.cache_dir={tmp_path / 'cache'}",
        "features.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    train(compose_config("train", train_overrides))

    retrieve(compose_config("retrieve", [*overrides, "explain=both", f"head_checkpoint={tmp_path / 'train'}", "k=2"]))

    class_maps = np.load(tmp_path / "run" / "maps" / "class_maps.npy")
    assert class_maps.shape == (3, 160, 160)
    assert (tmp_path / "run" / "retrieval.png").is_file()


def test_invalid_explain_names_choices(overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="Invalid explain='why'.*similarity"):
        retrieve(compose_config("retrieve", [*overrides, "explain=why"]))
