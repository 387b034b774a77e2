"""Hydra multiruns: the feature cache serves every seed, and a job without weights does not stop the sweep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SWEEP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import write_class_images

    base = tmp_path_factory.mktemp("sweep")
    images = write_class_images(base / "images")
    sweep = base / "sweep"
    command = [
        sys.executable,
        "-m",
        "cbir_lightning.train",
        "-m",
        "backbone=mobilenetv2",
        "weights.source=none,package",
        "seed=0,1",
        f"data.root={images}",
        "data.show_progress=false",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "features.num_workers=0",
        f"features.cache_dir={base / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def read_jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]


def test_sweep_runs_every_job(sweep_dir: Path) -> None:
    assert len(read_jobs(sweep_dir)) == 4


def test_sweep_extracts_features_once(sweep_dir: Path) -> None:
    trained = [job for job in read_jobs(sweep_dir) if job["status"] == "trained"]
    computed = sorted(job["features_computed"] for job in trained)

    assert [job["seed"] for job in trained] == [0, 1]
    assert computed == [0, 30]


def test_sweep_records_unavailable_weights(sweep_dir: Path) -> None:
    unavailable = [job for job in read_jobs(sweep_dir) if job["status"] == "weights unavailable"]

    assert len(unavailable) == 2
    assert all(job["backbone"] == "mobilenetv2" for job in unavailable)
    assert all("no PyPI package carries weights" in job["reason"] for job in unavailable)


def test_sweep_marks_random_weights(sweep_dir: Path) -> None:
    trained = [job for job in read_jobs(sweep_dir) if job["status"] == "trained"]

    assert all(job["random_weights"] for job in trained)
