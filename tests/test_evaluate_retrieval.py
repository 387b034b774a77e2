"""The leave-one-out evaluation command on a tiny generated folder."""

import json
from pathlib import Path

import pytest

from cbir_lightning.evaluate_retrieval import evaluate
from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.train import train
from tests.conftest import compose_config


@pytest.fixture
def overrides(tmp_path: Path, image_folder: Path, tiny_backbone: BackboneSpec) -> list[str]:
    return [
        f"output_dir={tmp_path / 'evaluation'}",
        f"data_root={image_folder}",
        "backbone.name=tiny",
        "weights.source=none",
        f"features.cache_dir={tmp_path / 'cache'}",
        "features.num_workers=0",
        "show_progress=false",
        "pca_dims=8",
        "cutoffs=[5]",
    ]


def test_evaluation_writes_every_option(overrides: list[str], tmp_path: Path) -> None:
    results = evaluate(compose_config("evaluate_retrieval", overrides))

    stored = json.loads((tmp_path / "evaluation" / "retrieval_metrics.json").read_text())
    table = (tmp_path / "evaluation" / "retrieval_metrics.md").read_text()
    assert stored == json.loads(json.dumps(results))
    assert list(stored["options"]) == ["raw_euclidean", "cosine", "query_expansion"]
    assert stored["settings"] == {"cutoffs": [5], "pca_dims": 8, "query_expansion_top_n": 3}
    assert stored["random_weights"] is True
    assert "RANDOM weights" in table
    for metrics in stored["options"].values():
        assert 0.0 < metrics["mAP"] <= 1.0
        assert set(metrics["per_class_mAP"]) == {"cats", "dogs", "owls"}


def test_colour_classes_retrieve_well(overrides: list[str]) -> None:
    # The generated classes differ by colour, which even a random backbone keeps apart.
    results = evaluate(compose_config("evaluate_retrieval", overrides))

    assert results["options"]["cosine"]["P@5"] > 0.6


def test_bf16_precision_is_recorded(overrides: list[str], tmp_path: Path) -> None:
    options = [*overrides, "features.precision=bf16", "options=[cosine]"]
    results = evaluate(compose_config("evaluate_retrieval", options))

    table = (tmp_path / "evaluation" / "retrieval_metrics.md").read_text()
    assert results["precision"] == "bf16"
    assert "bf16 features" in table
    assert results["options"]["cosine"]["P@5"] > 0.6


def test_head_penultimate_from_train_run(overrides: list[str], tmp_path: Path, image_folder: Path) -> None:
    train_overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={image_folder}",
        "data.show_progress=false",
        "backbone.name=tiny",
        "weights.source=none",
        f"features.cache_dir={tmp_path / 'cache'}",
        "features.num_workers=0",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    train(compose_config("train", train_overrides))

    options = [*overrides, f"head_checkpoint={tmp_path / 'run'}", "options=[head_penultimate]"]
    results = evaluate(compose_config("evaluate_retrieval", options))

    penultimate = results["options"]["head_penultimate"]
    assert 0.0 < penultimate["mAP"] <= 1.0
    assert penultimate["P@5"] > 0.6

    with pytest.raises(ValueError, match="preprocess='model'.*preprocess='paper'"):
        evaluate(compose_config("evaluate_retrieval", [*options, "preprocess=paper"]))


def test_head_option_needs_checkpoint(overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="set head_checkpoint="):
        evaluate(compose_config("evaluate_retrieval", [*overrides, "options=[head_penultimate]"]))


def test_pca_whiten_option(overrides: list[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        results = evaluate(compose_config("evaluate_retrieval", [*overrides, "options=[pca_whiten]", "pca_dims=500"]))

    assert 0.0 < results["options"]["pca_whiten"]["mAP"] <= 1.0
    assert "keeps 29 dims instead of 500" in caplog.text


@pytest.mark.parametrize("cutoffs", ["[0]", "[]"])
def test_bad_cutoffs_named(overrides: list[str], cutoffs: str) -> None:
    with pytest.raises(ValueError, match="Invalid cutoffs="):
        evaluate(compose_config("evaluate_retrieval", [*overrides, f"cutoffs={cutoffs}"]))


def test_unknown_option_names_choices(overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="Invalid options \\['fancy'\\].*raw_euclidean"):
        evaluate(compose_config("evaluate_retrieval", [*overrides, "options=[fancy]"]))
