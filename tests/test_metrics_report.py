"""Tests for the classification metrics against scikit-learn, and for the report files written from them."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from cbir_lightning.evaluation.metrics import SUMMARY_METRICS, build_classification_metrics, split_results
from cbir_lightning.evaluation.report import write_classification_report, write_confusion_matrix, write_metrics_json

NUM_CLASSES = 4
CLASS_NAMES = ["cat", "dog", "fox", "owl"]

# (target, predicted) pairs for 4 classes with support 5, 3, 2 and 4. The classes are interleaved, so that every
# batch below contains several classes.
FIXED_PAIRS = [
    (0, 0),
    (3, 3),
    (1, 1),
    (2, 2),
    (0, 1),
    (3, 3),
    (1, 0),
    (0, 0),
    (2, 3),
    (3, 1),
    (0, 2),
    (1, 1),
    (3, 3),
    (0, 0),
]
FIXED_BATCH_BOUNDS = [(0, 6), (6, 11), (11, 14)]

# Expected results for FIXED_PAIRS, worked out by hand from the confusion matrix.
FIXED_CONFUSION = [
    [3, 1, 1, 0],
    [1, 2, 0, 0],
    [0, 0, 1, 1],
    [0, 1, 0, 3],
]
FIXED_SUPPORT = [5, 3, 2, 4]
FIXED_ACCURACY = 9 / 14
FIXED_PRECISION = [3 / 4, 2 / 4, 1 / 2, 3 / 4]
FIXED_RECALL = [3 / 5, 2 / 3, 1 / 2, 3 / 4]


def f1_from_precision_recall(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall)


FIXED_F1 = [f1_from_precision_recall(p, r) for p, r in zip(FIXED_PRECISION, FIXED_RECALL, strict=True)]


def logits_for(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Build logits whose argmax is ``predicted``, as the classifier module passes them to the metrics."""
    logits = torch.full((len(predicted), num_classes), -1.0)
    logits[torch.arange(len(predicted)), predicted] = 2.0
    return logits


def compute_metrics(
    targets: torch.Tensor, logits: torch.Tensor, num_classes: int, batch_bounds: list[tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Feed the metric collection one ``update`` call per batch and return ``compute()``."""
    metrics = build_classification_metrics(num_classes)
    for start, stop in batch_bounds:
        metrics.update(logits[start:stop], targets[start:stop])
    return metrics.compute()


def fixed_case() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    targets = torch.tensor([target for target, _ in FIXED_PAIRS])
    predicted = torch.tensor([prediction for _, prediction in FIXED_PAIRS])
    results = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, FIXED_BATCH_BOUNDS)
    return targets, predicted, results


def random_case() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    num_classes = 5
    num_samples = 200
    generator = torch.Generator().manual_seed(1234)
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    # Adding 1.0 to the logit of the true class makes the predictions better than chance but still often wrong.
    logits = torch.randn(num_samples, num_classes, generator=generator)
    logits[torch.arange(num_samples), targets] += 1.0
    batch_bounds = [(start, min(start + 64, num_samples)) for start in range(0, num_samples, 64)]
    results = compute_metrics(targets, logits, num_classes, batch_bounds)
    return targets, logits.argmax(dim=1), results


@pytest.fixture(params=["fixed", "random"])
def computed_case(request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    return fixed_case() if request.param == "fixed" else random_case()


def test_metrics_match_sklearn(computed_case: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]) -> None:
    targets, predicted, results = computed_case
    num_classes = results["confusion_matrix"].shape[0]
    labels = list(range(num_classes))
    # Every class occurs in both, so sklearn's macro average covers the same classes as torchmetrics'.
    assert set(targets.tolist()) == set(labels)
    assert set(predicted.tolist()) == set(labels)

    precision_macro, recall_macro, f1_macro, _ = precision_recall_fscore_support(
        targets, predicted, labels=labels, average="macro"
    )
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, labels=labels, average=None)

    assert float(results["acc"]) == pytest.approx(accuracy_score(targets, predicted))
    assert float(results["precision_macro"]) == pytest.approx(precision_macro)
    assert float(results["recall_macro"]) == pytest.approx(recall_macro)
    assert float(results["f1_macro"]) == pytest.approx(f1_macro)
    assert results["precision_per_class"].tolist() == pytest.approx(precision.tolist())
    assert results["recall_per_class"].tolist() == pytest.approx(recall.tolist())
    assert results["f1_per_class"].tolist() == pytest.approx(f1.tolist())
    assert results["confusion_matrix"].tolist() == confusion_matrix(targets, predicted, labels=labels).tolist()


def test_metrics_fixed_table_by_hand() -> None:
    _, _, results = fixed_case()

    assert float(results["acc"]) == pytest.approx(FIXED_ACCURACY)
    assert results["precision_per_class"].tolist() == pytest.approx(FIXED_PRECISION)
    assert results["recall_per_class"].tolist() == pytest.approx(FIXED_RECALL)
    assert results["f1_per_class"].tolist() == pytest.approx(FIXED_F1)
    assert float(results["f1_macro"]) == pytest.approx(sum(FIXED_F1) / NUM_CLASSES)
    assert results["confusion_matrix"].tolist() == FIXED_CONFUSION


def test_metrics_batches_equal_single_update() -> None:
    targets, predicted, batched = fixed_case()
    single = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, [(0, len(targets))])

    for name, value in single.items():
        assert batched[name].flatten().tolist() == pytest.approx(value.flatten().tolist()), name


def test_metrics_class_absent_everywhere() -> None:
    # Class 3 occurs neither in the targets nor in the predictions.
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0])
    results = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, [(0, 4), (4, 7)])
    present_labels = [0, 1, 2]
    all_labels = list(range(NUM_CLASSES))
    precision_present, recall_present, f1_present, _ = precision_recall_fscore_support(
        targets, predicted, labels=present_labels, average="macro"
    )
    precision_all, _, _, _ = precision_recall_fscore_support(
        targets, predicted, labels=all_labels, average="macro", zero_division=0
    )

    # The per-class vectors report 0 for the absent class, but the macro averages leave it out (torchmetrics
    # drops classes with tp + fp + fn == 0). This equals sklearn with only the classes that occur, and differs
    # from sklearn with labels=range(num_classes) and zero_division=0.
    assert results["precision_per_class"][3].item() == 0.0
    assert results["recall_per_class"][3].item() == 0.0
    assert results["f1_per_class"][3].item() == 0.0
    assert float(results["precision_macro"]) == pytest.approx(precision_present)
    assert float(results["recall_macro"]) == pytest.approx(recall_present)
    assert float(results["f1_macro"]) == pytest.approx(f1_present)
    assert float(results["precision_macro"]) != pytest.approx(precision_all)
    assert float(results["precision_macro"]) != pytest.approx(results["precision_per_class"].mean().item())


def test_metrics_class_never_predicted() -> None:
    # Class 3 occurs once in the targets but is never predicted, so its precision is 0 / 0.
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0])
    results = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, [(0, 3), (3, 7)])
    labels = list(range(NUM_CLASSES))
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predicted, labels=labels, average="macro", zero_division=0
    )

    # The undefined precision counts as 0 and the class stays in the macro averages, as in sklearn with
    # zero_division=0.
    assert results["precision_per_class"][3].item() == 0.0
    assert float(results["precision_macro"]) == pytest.approx(precision)
    assert float(results["recall_macro"]) == pytest.approx(recall)
    assert float(results["f1_macro"]) == pytest.approx(f1)


def test_metrics_class_never_in_targets() -> None:
    # Class 3 is predicted once but never occurs in the targets, so its recall is 0 / 0.
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 3])
    results = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, [(0, 3), (3, 7)])
    labels = list(range(NUM_CLASSES))
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predicted, labels=labels, average="macro", zero_division=0
    )

    assert results["recall_per_class"][3].item() == 0.0
    assert float(results["precision_macro"]) == pytest.approx(precision)
    assert float(results["recall_macro"]) == pytest.approx(recall)
    assert float(results["f1_macro"]) == pytest.approx(f1)


def test_split_results_keys_and_types() -> None:
    _, _, results = fixed_case()

    scalars, tensors = split_results(results)

    assert set(scalars) == set(SUMMARY_METRICS)
    assert set(tensors) == set(results) - set(SUMMARY_METRICS)
    assert set(tensors) == {"precision_per_class", "recall_per_class", "f1_per_class", "confusion_matrix"}
    for name, value in scalars.items():
        assert type(value) is float, name
        assert value == pytest.approx(results[name].item()), name
    for name, value in tensors.items():
        assert isinstance(value, torch.Tensor), name
        assert value.device.type == "cpu", name
        assert torch.equal(value, results[name]), name


def parse_markdown_rows(path: Path) -> list[list[str]]:
    """Split each table row of a Markdown file into its stripped cells."""
    rows = []
    for line in path.read_text().splitlines():
        assert line.startswith("|"), line
        assert line.endswith("|"), line
        rows.append([cell.strip() for cell in line[1:-1].split("|")])
    return rows


def test_classification_report_rows(tmp_path: Path) -> None:
    _, _, results = fixed_case()
    scalars, tensors = split_results(results)
    path = tmp_path / "classification_report.md"

    write_classification_report(path, CLASS_NAMES, tensors, scalars)

    rows = parse_markdown_rows(path)
    assert rows[0] == ["class", "precision", "recall", "F1", "support"]
    assert len(rows) == 2 + NUM_CLASSES + 2
    class_rows = rows[2 : 2 + NUM_CLASSES]
    assert [row[0] for row in class_rows] == CLASS_NAMES
    assert [int(row[4]) for row in class_rows] == FIXED_SUPPORT
    assert class_rows[0] == ["cat", "0.7500", "0.6000", "0.6667", "5"]
    assert class_rows[1] == ["dog", "0.5000", "0.6667", "0.5714", "3"]
    assert rows[-2] == ["**macro average**", "0.6250", "0.6292", "0.6220", "14"]
    assert rows[-1] == ["**accuracy**", "", "", "0.6429", "14"]


def test_classification_report_four_decimals(tmp_path: Path) -> None:
    _, _, results = fixed_case()
    scalars, tensors = split_results(results)
    path = tmp_path / "classification_report.md"

    write_classification_report(path, CLASS_NAMES, tensors, scalars)

    scores = [cell for row in parse_markdown_rows(path)[2:] for cell in row[1:4] if cell]
    assert len(scores) == 3 * NUM_CLASSES + 3 + 1
    for cell in scores:
        assert re.fullmatch(r"\d\.\d{4}", cell), cell


def test_classification_report_absent_class(tmp_path: Path) -> None:
    # Class "owl" never occurs: its row shows zeros, and the macro row is the mean of the other three rows.
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2, 0])
    results = compute_metrics(targets, logits_for(predicted, NUM_CLASSES), NUM_CLASSES, [(0, 7)])
    scalars, tensors = split_results(results)
    path = tmp_path / "classification_report.md"

    write_classification_report(path, CLASS_NAMES, tensors, scalars)

    rows = parse_markdown_rows(path)
    assert rows[2 + 3] == ["owl", "0.0000", "0.0000", "0.0000", "0"]
    assert rows[-2] == ["**macro average**", "0.7222", "0.7222", "0.7000", "7"]


def test_confusion_matrix_csv(tmp_path: Path) -> None:
    _, _, results = fixed_case()

    write_confusion_matrix(tmp_path, CLASS_NAMES, results["confusion_matrix"])

    with (tmp_path / "confusion_matrix.csv").open(newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["true \\ predicted", *CLASS_NAMES]
    assert len(rows) == 1 + NUM_CLASSES
    for name, expected_counts, row in zip(CLASS_NAMES, FIXED_CONFUSION, rows[1:], strict=True):
        assert row[0] == name
        assert [int(value) for value in row[1:]] == expected_counts, name
    # Row "cat" counts true cats: 1 of them was predicted as "fox", and no fox was predicted as "cat".
    assert rows[1][3] == "1"
    assert rows[3][1] == "0"


def test_confusion_matrix_png(tmp_path: Path) -> None:
    _, _, results = fixed_case()

    write_confusion_matrix(tmp_path, CLASS_NAMES, results["confusion_matrix"])

    with Image.open(tmp_path / "confusion_matrix.png") as image:
        assert image.format == "PNG"
        width, height = image.size
    # The figure is square and at least 4 inches wide, saved at 120 dpi.
    assert width == height
    assert width >= 4 * 120
    assert width <= 2000


def test_metrics_json_round_trip(tmp_path: Path) -> None:
    metrics = {
        "backbone": "mobilenetv1_100",
        "test": {"acc": 0.9125, "f1_macro": 0.9087},
        "num_test": 200,
        "class_names": ["cat", "dog"],
        "weights_path": None,
        "features_cached": True,
    }
    path = tmp_path / "metrics.json"

    write_metrics_json(path, metrics)

    loaded = json.loads(path.read_text())
    assert loaded == metrics
    assert list(loaded) == list(metrics)
