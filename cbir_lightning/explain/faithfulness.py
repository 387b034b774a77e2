"""Deletion and insertion scores: how well a saliency map ranks the pixels that a model's score depends on.

For each image, the pixels are ordered from most to least salient by its map. Deletion replaces the top
fraction ``f`` of pixels with a baseline image and records the target score as ``f`` goes from 0 to 1.
Insertion starts from the baseline and puts back the top fraction of the original pixels. The area
under each curve, over ``f`` in [0, 1], is the score:

- deletion AUC: lower is more faithful (the score falls as soon as the salient pixels go);
- insertion AUC: higher is more faithful (the score rises as soon as the salient pixels return).

Both AUCs lie in the range of the score function: [0, 1] for a softmax class confidence, and [-1, 1] for
a cosine similarity (only [0, 1] when the embeddings are non-negative, as after a ReLU).

``random_maps`` and ``gaussian_maps`` are the baselines that a map should beat.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "BASELINES",
    "ScoreFunction",
    "baseline_images",
    "class_confidence_fn",
    "faithfulness_scores",
    "gaussian_maps",
    "random_maps",
    "similarity_score_fn",
]

ScoreFunction = Callable[[torch.Tensor], torch.Tensor]
"""A function from a batch of images ``(B, 3, H, W)`` to one target score per image, ``(B,)``.

Row i of every batch is a perturbed copy of image i, so the function may keep per-image targets.
"""

Baseline = Literal["blur", "mean"]
BASELINES: tuple[str, ...] = ("blur", "mean")
# Blur sigma as a fraction of the longer image side: about 5 px at 224 px.
BLUR_SIGMA_FRACTION = 5 / 224


def class_confidence_fn(model: nn.Module, class_indices: Sequence[int] | torch.Tensor) -> ScoreFunction:
    """Build a score function that returns the softmax probability of ``class_indices[i]`` for image i.

    ``model`` maps images to class logits, e.g. ``ClassScoreModel``.
    """
    indices = torch.as_tensor(class_indices, dtype=torch.int64).reshape(-1, 1)

    def score(images: torch.Tensor) -> torch.Tensor:
        probabilities = model(images).softmax(dim=-1)
        return probabilities.gather(1, indices.to(probabilities.device)).squeeze(1)

    return score


def similarity_score_fn(model: nn.Module, reference_embeddings: torch.Tensor | np.ndarray) -> ScoreFunction:
    """Build a score function that returns the cosine similarity of image i's embedding to reference row i.

    ``model`` maps images to embeddings, e.g. ``EmbeddingModel``. The similarity is computed as the
    search backends compute it for ``metric="cosine"``.
    """
    references = F.normalize(torch.as_tensor(reference_embeddings).detach().float(), dim=1)

    def score(images: torch.Tensor) -> torch.Tensor:
        embeddings = F.normalize(model(images).float(), dim=1)
        return (embeddings * references.to(embeddings.device)).sum(dim=1)

    return score


def random_maps(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` maps of uniform random values in [0, 1), ``(count, height, width)`` float32."""
    return np.random.default_rng(seed).random((count, height, width), dtype=np.float32)


def gaussian_maps(count: int, height: int, width: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """Return ``count`` copies of a Gaussian blob centred on the image, peak 1, ``(count, height, width)``.

    ``sigma_fraction`` is the standard deviation as a fraction of each side. It is the "objects are in the
    middle" baseline.
    """
    if sigma_fraction <= 0:
        raise ValueError(f"Invalid sigma_fraction={sigma_fraction}: it must be positive.")
    rows = (np.arange(height) - (height - 1) / 2) / (sigma_fraction * height)
    columns = (np.arange(width) - (width - 1) / 2) / (sigma_fraction * width)
    blob = np.exp(-0.5 * (rows[:, None] ** 2 + columns[None, :] ** 2)).astype(np.float32)
    return np.repeat(blob[None], count, axis=0)


def baseline_images(images: torch.Tensor, baseline: Baseline = "blur") -> torch.Tensor:
    """Return the images that replace deleted pixels: a Gaussian blur of each image, or its per-channel mean."""
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if baseline == "blur":
        height, width = images.shape[-2:]
        sigma = max(BLUR_SIGMA_FRACTION * max(height, width), 0.5)
        # Reflect padding needs a kernel radius below each side.
        kernel_size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(height, width) - 1)
        return TF.gaussian_blur(images, kernel_size=[kernel_size, kernel_size], sigma=[sigma, sigma])
    raise ValueError(f"Invalid baseline {baseline!r}. Choose one of: {', '.join(BASELINES)}.")


@torch.inference_mode()
def faithfulness_scores(
    score_fn: ScoreFunction,
    images: torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    steps: int = 20,
    baseline: Baseline = "blur",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Compute the deletion and insertion curves and AUCs of saliency maps.

    Each of the ``steps + 1`` points of a curve is one call of ``score_fn`` on the whole batch.

    Args:
        score_fn: maps images to one score per image, e.g. from ``class_confidence_fn`` or
            ``similarity_score_fn``.
        images: ``(B, 3, H, W)`` model inputs.
        maps: ``(B, H, W)`` saliency maps at the input resolution; higher is more salient.
        steps: number of equal fractions the pixels are removed or inserted in.
        baseline: what deleted pixels become, ``blur`` or ``mean`` (see ``baseline_images``).
        seed: orders pixels of equal saliency randomly, so that flat regions of a map are not
            removed from the top left.

    Returns:
        A dict of numpy arrays:

        - ``fractions`` ``(steps + 1,)``: the fraction of pixels removed or inserted at each point.
        - ``deletion_curve`` and ``insertion_curve`` ``(B, steps + 1)``: the score at each point.
        - ``deletion_auc`` and ``insertion_auc`` ``(B,)``: the trapezoid areas under the curves.

    Raises:
        ValueError: ``steps`` is below 1, the shapes of ``images`` and ``maps`` do not match, or a map
            contains NaN.
    """
    if steps < 1:
        raise ValueError(f"Invalid steps={steps}: it must be at least 1.")
    if images.ndim != 4:
        raise ValueError(f"Expected images (B, 3, H, W), got shape {tuple(images.shape)}.")
    saliency = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    batch, _, height, width = images.shape
    if tuple(saliency.shape) != (batch, height, width):
        raise ValueError(
            f"Maps of shape {tuple(saliency.shape)} do not match images of shape {tuple(images.shape)}: "
            f"expected ({batch}, {height}, {width})."
        )
    if torch.isnan(saliency).any():
        raise ValueError("Invalid maps: they contain NaN values, which have no salience order.")

    pixel_count = height * width
    ranks = _salience_ranks(saliency.reshape(batch, pixel_count), seed).to(images.device)
    replaced = baseline_images(images, baseline)
    counts = [round(step * pixel_count / steps) for step in range(steps + 1)]

    deletion, insertion = [], []
    for count in counts:
        # True where the pixel is among the ``count`` most salient of its image.
        top = (ranks < count).reshape(batch, 1, height, width)
        deletion.append(score_fn(torch.where(top, replaced, images)).float().cpu())
        insertion.append(score_fn(torch.where(top, images, replaced)).float().cpu())

    fractions = np.array(counts, dtype=np.float64) / pixel_count
    deletion_curve = torch.stack(deletion, dim=1).numpy()
    insertion_curve = torch.stack(insertion, dim=1).numpy()
    return {
        "fractions": fractions,
        "deletion_curve": deletion_curve,
        "insertion_curve": insertion_curve,
        "deletion_auc": _trapezoid_area(deletion_curve, fractions),
        "insertion_auc": _trapezoid_area(insertion_curve, fractions),
    }


def _salience_ranks(saliency: torch.Tensor, seed: int) -> torch.Tensor:
    """Return each pixel's rank in its image, 0 for the most salient, with ties in seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(saliency.shape[1], generator=generator) for _ in range(len(saliency))])
    shuffled = saliency.gather(1, shuffle)
    # A stable sort of the shuffled values keeps equal values in the shuffled order.
    order = shuffle.gather(1, torch.sort(shuffled, dim=1, descending=True, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(saliency.shape[1]).expand_as(order).contiguous())
    return ranks


def _trapezoid_area(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    widths = np.diff(fractions)
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * widths).sum(axis=1)
