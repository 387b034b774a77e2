"""The training entry point end to end on a tiny generated folder, and its errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from cbir_lightning.data.folder import scan_image_folder
from cbir_lightning.data.transforms import build_preprocessing
from cbir_lightning.features.cache import FeatureCache, FeatureKey
from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.heads import MLPHead
from cbir_lightning.train import train
from tests.conftest import compose_train_config, write_class_images

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
    assert stored["head_in_features"] == 256


def test_confusion_matrix_counts_test_split(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    metrics = train(compose_train_config(tiny_train_overrides))

    with (tmp_path / "run" / "confusion_matrix.csv").open() as stream:
        rows = list(csv.reader(stream))[1:]
    counts = [[int(value) for value in row[1:]] for row in rows]
    correct = sum(counts[index][index] for index in range(len(counts)))

    assert sum(map(sum, counts)) == metrics["num_test"]
    assert correct / metrics["num_test"] == pytest.approx(metrics["test_accuracy"])


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
    metrics = train(compose_train_config(tiny_train_overrides))
    checkpoint = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    head_config = {key: value for key, value in checkpoint["head"].items() if key != "_target_"}
    head = MLPHead(metrics["head_in_features"], len(checkpoint["class_names"]), **head_config)
    head.load_state_dict(checkpoint["state_dict"])
    head.eval()

    backbone = build_backbone(checkpoint["backbone"], checkpoint["weights_source"], pool=checkpoint["pool"])
    preprocessing = build_preprocessing(backbone.model, checkpoint["preprocess"])
    folder = scan_image_folder(metrics["data_root"], show_progress=False)
    with (tmp_path / "run" / "split.csv").open() as stream:
        test_paths = {row["path"] for row in csv.DictReader(stream) if row["split"] == "test"}
    test_records = [record for record in folder.records if record.relpath in test_paths]
    key = FeatureKey(checkpoint["backbone"], checkpoint["weights_id"], preprocessing.preprocess_id, checkpoint["pool"])
    cache = FeatureCache(tmp_path / "cache", key)
    features = cache.extract(test_records, backbone, preprocessing, show_progress=False)
    with torch.inference_mode():
        predictions = head(features).argmax(dim=1)
    labels = torch.tensor([record.label for record in test_records])

    assert checkpoint["class_names"] == ["cats", "dogs", "owls"]
    assert checkpoint["weights_source"] == "none"
    assert cache.stats.computed == 0
    assert (predictions == labels).float().mean().item() == pytest.approx(metrics["test_accuracy"])


def test_flatten_pool_trains(tiny_train_overrides: list[str]) -> None:
    metrics = train(compose_train_config([*tiny_train_overrides, "head.pool=flatten"]))

    assert metrics["pool"] == "flatten"
    # test_efficientnet has stride 32, so its 160 px input gives a 256 x 5 x 5 map.
    assert metrics["head_in_features"] == 256 * 5 * 5


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


def test_cli_reports_missing_weights(tmp_path: Path) -> None:
    # nasnetmobile has no timm download, so the default weights.source=auto fails with the alternatives.
    result = subprocess.run(
        [sys.executable, "-m", "cbir_lightning.train", "backbone=nasnetmobile", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "timm has no pretrained download for 'nasnetamobile'" in output
    assert "weights.source=file" in output
    assert "Traceback" not in result.stderr


def test_wandb_logger_runs_offline_and_closes(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    import wandb

    overrides = [*tiny_train_overrides, "logger=wandb", "trainer.max_epochs=1"]

    train(compose_train_config(overrides))

    assert wandb.run is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


def test_single_class_folder_is_rejected(tiny_train_overrides: list[str], image_folder: Path) -> None:
    for name in ("dogs", "owls"):
        for path in (image_folder / name).iterdir():
            path.unlink()
        (image_folder / name).rmdir()

    with pytest.raises(ValueError, match="1 class folder.*at least 2"):
        train(compose_train_config(tiny_train_overrides))


def test_empty_test_split_is_rejected(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    small = write_class_images(tmp_path / "small", per_class=2)

    with pytest.raises(ValueError, match="test split is empty.*data.fractions"):
        train(compose_train_config([*tiny_train_overrides, f"data.root={small}"]))


def test_unavailable_device_is_rejected(tiny_train_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(ValueError, match="features.device='cuda'.*features.device=cpu"):
        train(compose_train_config([*tiny_train_overrides, "features.device=cuda"]))


def test_head_config_error_comes_before_scan(tiny_train_overrides: list[str], tmp_path: Path) -> None:
    overrides = [*tiny_train_overrides, "head.dropout=[0.1]", f"data.root={tmp_path / 'missing'}"]

    with pytest.raises(InstantiationException, match="head.dropout has 1 values"):
        train(compose_train_config(overrides))


def test_cli_trains_with_multiple_workers(image_folder: Path, tmp_path: Path) -> None:
    # The tiny backbone is registered only inside this process, so the subprocess uses mobilenet's
    # architecture with random weights.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbir_lightning.train",
            f"data.root={image_folder}",
            "weights.source=none",
            "trainer.max_epochs=1",
            "features.num_workers=2",
            f"features.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["features_computed"] == 30
