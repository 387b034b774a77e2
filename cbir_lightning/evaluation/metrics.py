"""Classification metrics: overall accuracy, macro and per-class precision, recall and F1, and the confusion matrix."""

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

__all__ = ["SUMMARY_METRICS", "build_classification_metrics", "split_results"]

# Scalar metrics logged as ``<stage>/<name>``; the per-class vectors and the confusion matrix go to the report.
SUMMARY_METRICS = ("acc", "precision_macro", "recall_macro", "f1_macro")


def build_classification_metrics(num_classes: int) -> MetricCollection:
    """Build the metric collection for one stage.

    ``acc`` is the fraction of correct predictions (micro average). The
    ``*_macro`` scores average the per-class scores with equal weight per class.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "precision_per_class": MulticlassPrecision(num_classes, average="none"),
            "recall_per_class": MulticlassRecall(num_classes, average="none"),
            "f1_per_class": MulticlassF1Score(num_classes, average="none"),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }
    )


def split_results(results: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Split computed metrics into scalar summaries and tensors (per-class vectors, confusion matrix)."""
    scalars = {name: float(value) for name, value in results.items() if name in SUMMARY_METRICS}
    tensors = {name: value.detach().cpu() for name, value in results.items() if name not in SUMMARY_METRICS}
    return scalars, tensors
