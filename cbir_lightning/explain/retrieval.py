"""Heat maps for one retrieval: why each result was returned, and what the classifier saw.

``similarity`` maps explain the cosine similarity between the query and each result. On a result they
show the regions that match the query, and on the query the regions that a given result matched. ``class`` maps
explain the trained head's predicted class on every image. Maps are computed on the backbone's input view
(resized and cropped as the backbone sees it), in batches, with one CAM object per target kind.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image

from cbir_lightning.data.decode import load_rgb_image
from cbir_lightning.data.transforms import Preprocessing
from cbir_lightning.explain.cam import Explainer
from cbir_lightning.explain.targets import class_targets, load_class_head, similarity_targets
from cbir_lightning.models.backbone import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = ["EXPLAIN_MODES", "RetrievalMaps", "explain_retrieval", "input_view", "overlay"]

EXPLAIN_MODES = ("none", "class", "similarity", "both")


@dataclass
class RetrievalMaps:
    """Maps in [0, 1] at the backbone's input resolution; row 0 of ``views`` is the query."""

    views: np.ndarray  # (1 + k, H, W, 3) float in [0, 1]: each image as the backbone's input
    similarity_results: np.ndarray | None = None  # (k, H, W): what in each result matches the query
    similarity_query: np.ndarray | None = None  # (k, H, W): what in the query result i matched
    class_maps: np.ndarray | None = None  # (1 + k, H, W): the predicted class of each image
    class_names: list[str] = field(default_factory=list)  # the predicted class of each image, for class maps


def input_view(images: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """Undo the mean/std normalisation of preprocessed images: ``(B, H, W, 3)`` floats in [0, 1]."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlay(view: np.ndarray, heat_map: np.ndarray) -> np.ndarray:
    """Blend a heat map over an image view; returns uint8 RGB."""
    return show_cam_on_image(view.astype(np.float32), heat_map.astype(np.float32), use_rgb=True, image_weight=0.55)


def explain_retrieval(
    backbone: FrozenBackbone,
    preprocessing: Preprocessing,
    query_path: Path,
    result_paths: list[Path],
    mode: str,
    method: str = "gradcam",
    head_checkpoint: str | Path | None = None,
    batch_size: int = 16,
) -> RetrievalMaps:
    """Compute the maps that ``mode`` requests: ``class``, ``similarity`` or ``both``."""
    if mode not in EXPLAIN_MODES[1:]:
        raise ValueError(f"Invalid explain={mode!r}. Choose one of: {', '.join(EXPLAIN_MODES)}.")
    images = torch.stack([preprocessing.transform(load_rgb_image(path)) for path in [query_path, *result_paths]])
    maps = RetrievalMaps(views=input_view(images, preprocessing))
    if mode in ("class", "both"):
        _add_class_maps(maps, backbone, images, method, head_checkpoint, batch_size, preprocessing.mode)
    if mode in ("similarity", "both"):
        _add_similarity_maps(maps, backbone, images, method, batch_size)
    return maps


def _add_class_maps(
    maps: RetrievalMaps,
    backbone: FrozenBackbone,
    images: torch.Tensor,
    method: str,
    head_checkpoint: str | Path | None,
    batch_size: int,
    preprocess: str,
) -> None:
    class_head = load_class_head(head_checkpoint, backbone, preprocess)
    with Explainer.for_classes(backbone, class_head.head, method=method, batch_size=batch_size) as explainer:
        maps.class_maps = explainer.explain(images, class_targets([None] * len(images)))
        predicted = explainer.last_outputs.argmax(dim=1).tolist()
    maps.class_names = [class_head.class_names[index] for index in predicted]


def _add_similarity_maps(
    maps: RetrievalMaps, backbone: FrozenBackbone, images: torch.Tensor, method: str, batch_size: int
) -> None:
    # The embeddings are computed before the CAM hooks exist, so that they cost no hook work.
    with torch.inference_mode():
        embeddings = backbone(images).float()
    query, results = images[:1], images[1:]
    count = len(results)
    with Explainer.for_similarity(backbone, method=method, batch_size=batch_size) as explainer:
        maps.similarity_results = explainer.explain(results, similarity_targets(embeddings[:1].expand(count, -1)))
        maps.similarity_query = explainer.explain(query.expand(count, -1, -1, -1), similarity_targets(embeddings[1:]))
