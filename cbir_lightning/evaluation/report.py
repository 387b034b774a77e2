"""Run reports: the classification report, the confusion matrix as CSV and PNG, and ``metrics.json``."""

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["write_classification_report", "write_confusion_matrix", "write_metrics_json"]


def write_classification_report(
    path: Path, class_names: Sequence[str], tensors: dict[str, torch.Tensor], scalars: dict[str, float]
) -> None:
    """Write a Markdown table of per-class precision, recall, F1 and support, with macro averages."""
    support = tensors["confusion_matrix"].sum(dim=1)
    lines = [
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for index, name in enumerate(class_names):
        lines.append(
            f"| {name} | {tensors['precision_per_class'][index]:.4f} | {tensors['recall_per_class'][index]:.4f} "
            f"| {tensors['f1_per_class'][index]:.4f} | {int(support[index])} |"
        )
    lines.append(
        f"| **macro average** | {scalars['precision_macro']:.4f} | {scalars['recall_macro']:.4f} "
        f"| {scalars['f1_macro']:.4f} | {int(support.sum())} |"
    )
    lines.append(f"| **accuracy** | | | {scalars['acc']:.4f} | {int(support.sum())} |")
    path.write_text("\n".join(lines) + "\n")


def write_confusion_matrix(
    directory: Path, class_names: Sequence[str], matrix: torch.Tensor, title: str | None = None
) -> None:
    """Write ``confusion_matrix.csv`` (rows: true class, columns: predicted class) and ``confusion_matrix.png``."""
    counts = matrix.to(torch.long).tolist()
    with (directory / "confusion_matrix.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, counts, strict=True):
            writer.writerow([name, *row])
    _plot_confusion_matrix(directory / "confusion_matrix.png", class_names, counts, title)


def _plot_confusion_matrix(path: Path, class_names: Sequence[str], counts: list[list[int]], title: str | None) -> None:
    size = max(4.0, 0.55 * len(class_names) + 2.0)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    threshold = max(max(row) for row in counts) / 2 if counts else 0
    for row_index, row in enumerate(counts):
        for column_index, value in enumerate(row):
            color = "white" if value > threshold else "black"
            axes.text(column_index, row_index, str(value), ha="center", va="center", color=color, fontsize=8)
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as indented JSON."""
    path.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
