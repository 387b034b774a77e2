"""Leave-one-out retrieval metrics: every image queries all the others, and same-class images are relevant.

Scores come from torchmetrics' retrieval metrics over the full ranking of the other N - 1 images:
mean average precision (mAP), precision@k, recall@k, and mAP per query class.
"""

import logging
from collections.abc import Sequence

import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision, RetrievalRecall

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CUTOFFS", "leave_one_out_metrics", "ranking_metrics", "similarity_matrix"]

DEFAULT_CUTOFFS = (10, 12, 20)
METRICS = ("cosine", "euclidean")


def similarity_matrix(embeddings: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Return an (N, N) matrix in which a higher value means a closer pair.

    ``cosine`` compares L2-normalised vectors. ``euclidean`` returns the negated Euclidean distance of the
    raw vectors, so that both metrics rank in the same direction.
    """
    if metric == "cosine":
        normalised = F.normalize(embeddings.float(), dim=1)
        return normalised @ normalised.T
    if metric == "euclidean":
        return -torch.cdist(embeddings.float(), embeddings.float())
    raise ValueError(f"Invalid metric {metric!r}. Choose one of: {', '.join(METRICS)}.")


def leave_one_out_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    metric: str = "cosine",
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
) -> dict[str, float | dict[str, float]]:
    """Rank all other images for every image and score the rankings against the class labels.

    Returns ``mAP``, ``P@k`` and ``R@k`` for each cutoff k, and ``per_class_mAP`` keyed by class name.
    """
    return ranking_metrics(similarity_matrix(embeddings, metric), labels, class_names, cutoffs)


def ranking_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
) -> dict[str, float | dict[str, float]]:
    """Score leave-one-out rankings given as an (N, N) matrix in which a higher value means a closer pair.

    The diagonal (each image against itself) is left out of every ranking.
    """
    count = len(scores)
    if count < 2:
        raise ValueError(f"Leave-one-out needs at least 2 images, got {count}.")
    others = ~torch.eye(count, dtype=torch.bool)
    preds = scores[others].view(count, count - 1)
    # torchmetrics 1.9 treats a relevant item with a prediction <= 0 as irrelevant (see its
    # retrieval_average_precision), so the scores are shifted to be positive. The shift keeps every ranking.
    preds = preds - preds.min() + 1.0
    relevant = (labels[None, :] == labels[:, None])[others].view(count, count - 1)
    query_ids = torch.arange(count)[:, None].expand(count, count - 1)

    results: dict[str, float | dict[str, float]] = {"mAP": _score(RetrievalMAP(), preds, relevant, query_ids)}
    for k in cutoffs:
        results[f"P@{k}"] = _score(RetrievalPrecision(top_k=k), preds, relevant, query_ids)
        results[f"R@{k}"] = _score(RetrievalRecall(top_k=k), preds, relevant, query_ids)
    results["per_class_mAP"] = {
        name: _score(RetrievalMAP(), preds[labels == label], relevant[labels == label], query_ids[labels == label])
        for label, name in enumerate(class_names)
        if bool((labels == label).any())
    }
    return results


def _score(metric, preds: torch.Tensor, relevant: torch.Tensor, query_ids: torch.Tensor) -> float:
    return float(metric(preds.flatten(), relevant.flatten(), indexes=query_ids.flatten()))
