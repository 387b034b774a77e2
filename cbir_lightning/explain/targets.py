"""CAM targets (the scalar each map explains) and the loading of a trained classifier head for them.

A target is called by pytorch-grad-cam with one image's model output and returns a scalar tensor:

- ``ClassTarget`` on class logits (``ClassScoreModel``): the logit of one class.
- ``SimilarityTarget`` on retrieval embeddings (``EmbeddingModel``): the cosine similarity to a reference
  embedding, computed as ``cbir_lightning.retrieval.search`` computes it for ``metric="cosine"``.
"""

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cbir_lightning.models.backbone import FrozenBackbone
from cbir_lightning.models.heads import MLPHead

log = logging.getLogger(__name__)

__all__ = [
    "ClassHead",
    "ClassTarget",
    "SimilarityTarget",
    "class_targets",
    "load_class_head",
    "similarity_targets",
]

HEAD_FILE_NAME = "head.pt"
# The only head class a checkpoint may name. Building it directly, rather than instantiating whatever
# ``_target_`` a file names, keeps a checkpoint from calling arbitrary code.
MLP_HEAD_TARGET = "cbir_lightning.models.heads.MLPHead"
CHECKPOINT_KEYS = ("state_dict", "head", "class_names", "backbone", "weights_id", "pool")


class ClassTarget:
    """The logit of class ``class_index``, or of the highest-scoring class when ``class_index`` is None."""

    def __init__(self, class_index: int | None = None) -> None:
        self.class_index = class_index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the chosen logit for ``(K,)`` logits, or one per row for ``(B, K)`` logits."""
        if self.class_index is not None:
            return logits[..., self.class_index]
        predicted = logits.argmax(dim=-1, keepdim=True)
        return logits.gather(-1, predicted).squeeze(-1)

    def __repr__(self) -> str:
        return f"ClassTarget(class_index={self.class_index})"


class SimilarityTarget:
    """The cosine similarity between an image's embedding and a reference embedding.

    To explain a retrieval result, the reference is the query's embedding. To explain the query, it is
    the result's embedding. Both vectors are L2-normalised in float32 and multiplied, as the search backends do
    for ``metric="cosine"``, so the value equals the score the index reports for the pair.

    Raises:
        ValueError: the reference is not one vector, or contains NaN or infinite values.
    """

    def __init__(self, reference_embedding: torch.Tensor | np.ndarray) -> None:
        reference = torch.as_tensor(reference_embedding).detach().to("cpu", torch.float32)
        if reference.ndim == 2 and reference.shape[0] == 1:
            reference = reference[0]
        if reference.ndim != 1:
            raise ValueError(
                f"Invalid reference embedding: expected one (D,) vector, got shape {tuple(reference.shape)}."
            )
        if not torch.isfinite(reference).all():
            raise ValueError("Invalid reference embedding: it contains NaN or infinite values.")
        self.reference = F.normalize(reference, dim=0)

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        """Return the similarity for a ``(D,)`` embedding, or one per row for ``(B, D)`` embeddings."""
        normalized = F.normalize(embedding.float(), dim=-1)
        return normalized @ self.reference.to(embedding.device)

    def __repr__(self) -> str:
        return f"SimilarityTarget(dim={self.reference.numel()})"


def class_targets(class_indices: Sequence[int | None]) -> list[ClassTarget]:
    """Build one ``ClassTarget`` per image. ``None`` picks that image's predicted class."""
    return [ClassTarget(None if index is None else int(index)) for index in class_indices]


def similarity_targets(reference_embeddings: torch.Tensor | np.ndarray) -> list[SimilarityTarget]:
    """Build one ``SimilarityTarget`` per row of a ``(B, D)`` matrix of reference embeddings."""
    matrix = torch.as_tensor(reference_embeddings)
    if matrix.ndim != 2:
        raise ValueError(f"Invalid reference embeddings: expected a (B, D) matrix, got shape {tuple(matrix.shape)}.")
    return [SimilarityTarget(row) for row in matrix]


@dataclass(frozen=True)
class ClassHead:
    """A trained classifier head, frozen and in eval mode, with the facts its checkpoint records."""

    head: MLPHead
    class_names: list[str]
    path: Path  # head.pt file the head was loaded from
    preprocess: str | None  # preprocess mode of the training run, which the explained images must also use


def load_class_head(
    head_checkpoint: str | Path | None, backbone: FrozenBackbone, preprocess: str | None = None
) -> ClassHead:
    """Load the ``head.pt`` of a training run and check that it was trained on ``backbone``'s features.

    Args:
        head_checkpoint: a training run folder (which contains ``head.pt``) or the ``head.pt`` file.
        backbone: the backbone the head will sit on. Its name, weights id and pool mode must match the
            checkpoint's, because a head only fits the features it was trained on.
        preprocess: the preprocessing mode of the images the head will see. When given, it must match
            the training run's too.

    Raises:
        FileNotFoundError: no checkpoint is given or none exists at the path. The message gives the training command.
        ValueError: the file is not a head checkpoint of ``cbir_lightning.train``, or it was trained for
            another backbone, weights, pool mode or preprocessing mode.
    """
    path = _resolve_checkpoint_path(head_checkpoint, backbone.spec.name)
    checkpoint = _read_checkpoint(path)
    _check_matches_backbone(checkpoint, path, backbone, preprocess)
    head = _build_head(checkpoint, path)
    log.info("Loaded classifier head %s (%d classes)", path, len(checkpoint["class_names"]))
    return ClassHead(head, list(checkpoint["class_names"]), path, checkpoint.get("preprocess"))


def _resolve_checkpoint_path(head_checkpoint: str | Path | None, backbone_name: str) -> Path:
    hint = (
        f"Train a head first with `python -m cbir_lightning.train backbone={backbone_name}` and pass its run "
        f"folder, or the {HEAD_FILE_NAME} file in it, as the head checkpoint."
    )
    if head_checkpoint is None:
        raise FileNotFoundError(f"Class explanations need a trained classifier head, but none was given. {hint}")
    path = Path(head_checkpoint).expanduser()
    if path.is_dir():
        path = path / HEAD_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Head checkpoint not found: {path}. {hint}")
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"Invalid head checkpoint {path}: torch.load failed: {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Invalid head checkpoint {path}: expected a dict, got {type(checkpoint).__name__}.")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"Invalid head checkpoint {path}: missing {', '.join(missing)}. "
            "Use the head.pt that `python -m cbir_lightning.train` writes."
        )
    return checkpoint


def _check_matches_backbone(
    checkpoint: dict[str, Any], path: Path, backbone: FrozenBackbone, preprocess: str | None
) -> None:
    expected = {"backbone": backbone.spec.name, "weights_id": backbone.weights_id, "pool": backbone.pool}
    if preprocess is not None and checkpoint.get("preprocess") is not None:
        expected["preprocess"] = preprocess
    for key, value in expected.items():
        if checkpoint[key] != value:
            raise ValueError(
                f"Head checkpoint {path} was trained with {key}={checkpoint[key]!r}, but the backbone has "
                f"{key}={value!r}. Build the backbone as the training run did (backbone, weights.source, "
                f"weights.path, head.pool, preprocess), or train a head for this backbone."
            )


def _build_head(checkpoint: dict[str, Any], path: Path) -> MLPHead:
    config = dict(checkpoint["head"])
    target = config.pop("_target_", None)
    if target != MLP_HEAD_TARGET:
        raise ValueError(f"Unsupported head {target!r} in {path}: only {MLP_HEAD_TARGET} heads can be loaded.")
    state_dict = checkpoint["state_dict"]
    first_weight = state_dict.get("layers.0.weight")
    if first_weight is None or first_weight.ndim != 2:
        raise ValueError(f"Invalid head checkpoint {path}: the state_dict has no first Linear layer (layers.0.weight).")
    head = MLPHead(
        in_features=first_weight.shape[1],
        num_classes=len(checkpoint["class_names"]),
        hidden=config.get("hidden", ()),
        dropout=config.get("dropout"),
        pool=config.get("pool", checkpoint["pool"]),
    )
    try:
        head.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"Invalid head checkpoint {path}: the weights do not fit its head config: {error}") from error
    head.requires_grad_(False)
    return head.eval()
