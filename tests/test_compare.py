"""The comparison report: grouping, mean and spread over seeds, and marked rows."""

import json
from pathlib import Path

import pytest
from PIL import Image

from experiments.compare import group_jobs, load_jobs, main, markdown_table


def write_job(folder: Path, **fields: object) -> None:
    folder.mkdir(parents=True)
    job = {
        "status": "trained",
        "backbone": "mobilenet",
        "weights_id": "package:nudity==0.2.3",
        "preprocess": "model",
        "pool": "avg",
        "random_weights": False,
        "test_accuracy": 0.9,
        "test_precision_macro": 0.9,
        "test_recall_macro": 0.9,
        "test_f1_macro": 0.9,
    }
    job.update(fields)
    (folder / "metrics.json").write_text(json.dumps(job))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    write_job(tmp_path / "0", seed=0, test_accuracy=0.98)
    write_job(tmp_path / "1", seed=1, test_accuracy=0.96)
    write_job(tmp_path / "2", seed=0, pool="flatten", test_accuracy=0.95)
    write_job(tmp_path / "3", backbone="vgg16", weights_id="none:seed0", random_weights=True, test_accuracy=0.4)
    write_job(
        tmp_path / "4",
        status="weights unavailable",
        backbone="xception",
        weights_id=None,
        weights_source="auto",
        reason="No weights for backbone 'xception' from weights.source=hub",
    )
    return tmp_path


def test_groups_split_by_pool(sweep: Path) -> None:
    groups = group_jobs(load_jobs([sweep]))

    keys = [(group.backbone, group.pool) for group in groups]
    assert keys == [("xception", "avg"), ("mobilenet", "avg"), ("mobilenet", "flatten"), ("vgg16", "avg")]


def test_mean_and_sample_std_over_seeds(sweep: Path) -> None:
    mobilenet = group_jobs(load_jobs([sweep]))[1]

    mean, spread = mobilenet.mean_std("test_accuracy")

    assert mean == pytest.approx(0.97)
    assert spread == pytest.approx(0.0141421, abs=1e-6)


def test_table_marks_random_and_unavailable(sweep: Path) -> None:
    table = markdown_table(group_jobs(load_jobs([sweep])))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}

    assert "RANDOM weights" in rows["vgg16"]
    assert "weights unavailable" in rows["xception"]
    assert "0.9700 ± 0.0141" in table
    assert "| 0.9495 |" in rows["mobilenet"]
    assert "No weights for backbone 'xception'" in table


def test_main_writes_markdown_and_png(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"

    main([str(sweep), "--out", str(out)])

    assert (out / "comparison.md").read_text().startswith("| backbone |")
    with Image.open(out / "comparison.png") as image:
        assert image.width > 600


def test_no_metrics_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="No metrics.json found"):
        load_jobs([tmp_path])


def test_results_section_is_replaced(sweep: Path, tmp_path: Path) -> None:
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Title\n\n<!-- comparison:start -->\nold table\n<!-- comparison:end -->\n\nLater text.\n")

    main([str(sweep), "--out", str(tmp_path / "report"), "--results", str(results)])

    text = results.read_text()
    assert "old table" not in text
    assert text.startswith("# Title\n\n<!-- comparison:start -->\n| backbone |")
    assert text.endswith("<!-- comparison:end -->\n\nLater text.\n")
    assert (results.parent / "comparison.png").is_file()


def test_results_without_markers_is_an_error(sweep: Path, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("no markers here\n")

    with pytest.raises(SystemExit, match="no '<!-- comparison:start -->'"):
        main([str(sweep), "--out", str(tmp_path / "report"), "--results", str(results)])
