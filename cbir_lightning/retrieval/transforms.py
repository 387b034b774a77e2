"""Embedding options compared by the retrieval evaluation: raw features, the trained head's penultimate
layer, PCA whitening, and average query expansion over leave-one-out rankings."""

import logging

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

log = logging.getLogger(__name__)

__all__ = ["expanded_query_scores", "head_penultimate", "pca_whiten"]


def head_penultimate(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Return the activations before the head's final Linear layer, the learned embedding of a train run."""
    if not hasattr(head, "penultimate"):
        raise ValueError(f"{type(head).__name__} has no penultimate(); use cbir_lightning.models.heads.MLPHead.")
    head.eval()
    with torch.inference_mode():
        return head.penultimate(features)


def pca_whiten(features: torch.Tensor, dims: int = 256, epsilon: float = 1e-6) -> torch.Tensor:
    """Project L2-normalised features on their top ``dims`` principal axes, each scaled to unit variance.

    The projection is fitted on the same images it transforms, as is usual for unsupervised whitening of a
    fixed gallery.
    """
    normalised = F.normalize(features.double(), dim=1)
    centred = normalised - normalised.mean(dim=0, keepdim=True)
    usable = min(dims, centred.shape[0] - 1, centred.shape[1])
    if usable < dims:
        log.warning(
            "PCA whitening keeps %d dims instead of %d: %d images of %d dims have no more axes.",
            usable,
            dims,
            centred.shape[0],
            centred.shape[1],
        )
    dims = usable
    _, singular_values, right = torch.linalg.svd(centred, full_matrices=False)
    scale = singular_values[:dims] / (centred.shape[0] - 1) ** 0.5
    return (centred @ right[:dims].T / (scale + epsilon)).float()


def expanded_query_scores(features: torch.Tensor, top_n: int = 3) -> torch.Tensor:
    """Return cosine scores after average query expansion, for leave-one-out evaluation.

    Each query vector is replaced by the mean of itself and its ``top_n`` nearest other images (cosine), then
    ranked again against the gallery. The query itself never counts as one of its own neighbours.

    Raises:
        ValueError: ``top_n`` is not between 1 and the number of other images.
    """
    if not 1 <= top_n <= len(features) - 1:
        raise ValueError(
            f"Invalid query_expansion_top_n={top_n}: it must be between 1 and {len(features) - 1}, "
            f"the number of other images."
        )
    unit = F.normalize(features.float(), dim=1)
    first_pass = unit @ unit.T
    first_pass.fill_diagonal_(float("-inf"))
    neighbours = first_pass.topk(top_n, dim=1).indices
    expanded = F.normalize(unit + unit[neighbours].sum(dim=1), dim=1)
    return expanded @ unit.T
