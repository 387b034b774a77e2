"""The training entry point end to end on a tiny generated folder, and its errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

from cbir_lightning.train import train
from tests.conftest import compose_train_config

RUN_FILES = (
    "metrics.json",
    "classification_report.md",
    "confusion_matrix.png",
    "confusion_matrix.csv",
    "split.csv",
    "skipped.csv",
    "head.pt",
)
METRIC_KEYS = (
    "backbone",
    "weights_source",
    "preprocess",
    "test_accuracy",
    "test_precision_macro",
    "test_recall_macro",
    "test_f1_macro",
    "num_train",
    "num_val",
    "num_test",
    "num_skipped",
)


def test_train_writes_every_output(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_train_config(tiny_train_overrides)

    metrics = train(cfg)

    run_dir = tmp_path / "run"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in stored, key
    assert stored == json.loads(json.dumps(metrics))
    assert stored["weights_source"] == "none"
    assert stored["random_weights"] is True
    assert (stored["num_train"], stored["num_val"], stored["num_test"]) == (21, 3, 6)
    assert 0.0 <= stored["test_accuracy"] <= 1.0


def test_train_logs_metric_keys(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    train(compose_train_config(tiny_train_overrides))

    with (tmp_path / "run" / "csv" / "metrics.csv").open() as stream:
        columns = next(csv.reader(stream))

    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "test/f1_macro"):
        assert key in columns, key


def test_second_run_reads_features_from_cache(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    first = train(compose_train_config(tiny_train_overrides))
    second_overrides = [*tiny_train_overrides, f"output_dir={tmp_path / 'second'}", "seed=1"]

    second = train(compose_train_config(second_overrides))

    assert first["features_computed"] == 30
    assert second["features_computed"] == 0
    assert second["features_cached"] == 30


def test_bad_files_are_skipped_and_listed(tiny_train_overrides: list[str], image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "dogs" / "notes.txt").write_text("not an image")

    metrics = train(compose_train_config(tiny_train_overrides))

    with (tmp_path / "run" / "skipped.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert metrics["num_skipped"] == 2
    assert sorted(Path(row["path"]).name for row in rows) == ["broken.jpg", "notes.txt"]


def test_split_csv_lists_every_image(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    train(compose_train_config(tiny_train_overrides))

    with (tmp_path / "run" / "split.csv").open() as stream:
        rows = list(csv.DictReader(stream))

    assert len(rows) == 30
    assert set(rows[0]) == {"path", "class", "split"}
    assert {row["split"] for row in rows} == {"train", "val", "test"}


def test_head_checkpoint_restores_predictions(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    from cbir_lightning.models.heads import MLPHead

    train(compose_train_config(tiny_train_overrides))
    checkpoint = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    head_config = {key: value for key, value in checkpoint["head"].items() if key != "_target_"}
    in_features = checkpoint["state_dict"]["layers.0.weight"].shape[1]

    head = MLPHead(in_features, len(checkpoint["class_names"]), **head_config)
    head.load_state_dict(checkpoint["state_dict"])

    assert checkpoint["backbone"] == "tiny"
    assert checkpoint["class_names"] == ["cats", "dogs", "owls"]
    assert checkpoint["pool"] == "avg"


def test_flatten_pool_trains(tiny_train_overrides: list[str]) -> None:
    metrics = train(compose_train_config([*tiny_train_overrides, "head.pool=flatten"]))

    assert metrics["pool"] == "flatten"


def test_paper_preprocessing_trains(tiny_train_overrides: list[str]) -> None:
    metrics = train(compose_train_config([*tiny_train_overrides, "preprocess=paper"]))

    assert metrics["preprocess_id"].startswith("paper:224x224")


def test_backbone_config_selects_paper_head() -> None:
    cfg = compose_train_config(["backbone=xception"])

    assert list(cfg.head.hidden) == [256, 128]
    assert list(cfg.head.dropout) == [0.4, 0.0]


def test_command_line_head_override_wins() -> None:
    cfg = compose_train_config(["backbone=xception", "head=mlp_64_64"])

    assert list(cfg.head.hidden) == [64, 64]


def test_cli_reports_unimplemented_backbone(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cbir_lightning.train", "backbone=nasnetmobile", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 1
    assert "not implemented yet" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_wandb_logger_runs_offline_and_closes(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    import wandb

    overrides = [*tiny_train_overrides, "logger=wandb", "trainer.max_epochs=1"]

    train(compose_train_config(overrides))

    assert wandb.run is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
