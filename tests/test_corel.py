"""Real-data checks: train on the COREL-1K photos with the real MobileNet v1 package weights.

Needs the data set at ../shared/data/corel-1k (or $CBIR_DATA) and the weight packages that
``make install`` installs. Takes about a minute on 2 CPU cores.
"""

import os
from pathlib import Path

import pytest

from cbir_lightning.data.datamodule import DATA_ENV_VAR
from cbir_lightning.train import train
from tests.conftest import COREL_ROOT, compose_train_config

pytestmark = pytest.mark.corel


@pytest.fixture(scope="module")
def corel_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = Path(os.environ.get(DATA_ENV_VAR, COREL_ROOT))
    assert root.is_dir(), f"COREL-1K not found at {root}: set {DATA_ENV_VAR} or place it at {COREL_ROOT}"
    run_dir = tmp_path_factory.mktemp("corel")
    overrides = [
        f"output_dir={run_dir / 'run'}",
        f"data.root={root}",
        "data.show_progress=false",
        "backbone=mobilenet",
        "weights.source=package",
        f"features.cache_dir={run_dir / 'cache'}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
    ]
    return train(compose_train_config(overrides))


def test_corel_mobilenet_accuracy(corel_metrics: dict) -> None:
    assert corel_metrics["test_accuracy"] >= 0.95


def test_corel_split_sizes(corel_metrics: dict) -> None:
    assert (corel_metrics["num_train"], corel_metrics["num_val"], corel_metrics["num_test"]) == (700, 100, 200)
    assert corel_metrics["num_skipped"] == 0


def test_corel_uses_real_weights(corel_metrics: dict) -> None:
    assert corel_metrics["weights_id"] == "package:nudity==0.2.3"
    assert corel_metrics["random_weights"] is False
