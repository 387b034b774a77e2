"""Class activation maps (Grad-CAM and related methods) for classifier heads and retrieval similarity.

An ``Explainer`` wraps one pytorch-grad-cam CAM object for a whole run. It is a context manager, so the
hooks that the CAM registers on the target layer are removed when the ``with`` block ends, also on an
exception::

    with Explainer.for_similarity(backbone) as explainer:
        maps = explainer.explain(images, similarity_targets(query_embeddings))  # (B, H, W) in [0, 1]

The model that the CAM wraps maps images to the value a target scores: class logits for ``ClassTarget``
(``ClassScoreModel``) or the pooled retrieval embedding for ``SimilarityTarget`` (``EmbeddingModel``).
"""

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from cbir_lightning.models.backbone import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = [
    "CAM_METHODS",
    "ClassScoreModel",
    "EmbeddingModel",
    "Explainer",
    "normalize_maps",
    "vit_reshape_transform",
]

# CAM methods by the name users pass. EigenCAM ignores the targets because it projects the target
# layer's activations on their first principal component, so every target gets the same map.
CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
}
DEFAULT_METHOD = "gradcam"

# A map whose values span less than this is treated as constant and becomes all zeros. pytorch-grad-cam
# returns maps scaled to [0, 1] already, so the threshold is relative to a span of 1.
CONSTANT_MAP_RANGE = 1e-6

Target = Callable[[torch.Tensor], torch.Tensor]
ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


class ClassScoreModel(nn.Module):
    """Map images to class logits, ``head(pool(backbone.feature_map(images)))``.

    The pooling is the backbone's own (``avg`` or ``flatten``), the one the head was trained on.
    """

    def __init__(self, backbone: FrozenBackbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class EmbeddingModel(nn.Module):
    """Map images to their retrieval embedding: the backbone's average-pooled features, not normalised.

    Raises:
        ValueError: the backbone pools with ``flatten``. Retrieval embeddings are average-pooled, so a
            similarity computed from flattened features would differ from the one the index reports.
    """

    def __init__(self, backbone: FrozenBackbone) -> None:
        super().__init__()
        if backbone.pool != "avg":
            raise ValueError(
                f"Similarity explanations need the retrieval embedding, which is average-pooled, but the backbone "
                f"has pool={backbone.pool!r}. Build it with build_backbone(..., pool='avg')."
            )
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def vit_reshape_transform(
    num_prefix_tokens: int | None = None, grid_size: tuple[int, int] | None = None
) -> ReshapeTransform:
    """Build a transform from ViT tokens ``(B, N, C)`` to a feature map ``(B, C, h, w)``, for CAM methods.

    The first ``num_prefix_tokens`` tokens (class and register tokens) are dropped and the remaining
    patch tokens are laid out on the ``grid_size`` grid, row by row. Four-dimensional inputs pass through
    unchanged, so the transform also suits convolutional target layers.

    Args:
        num_prefix_tokens: tokens before the patch tokens; timm ViTs store it as ``model.num_prefix_tokens``.
            ``None`` derives it from the token count for a square grid: ``N - floor(sqrt(N))**2``. That is
            only right when there are fewer than ``2 * floor(sqrt(N)) + 1`` prefix tokens.
        grid_size: ``(h, w)`` of the patch grid, e.g. ``model.patch_embed.grid_size`` in timm. ``None``
            assumes a square grid.

    The returned transform raises ``ValueError`` when the token count does not fit the prefix and grid.
    """
    if num_prefix_tokens is not None and num_prefix_tokens < 0:
        raise ValueError(f"Invalid num_prefix_tokens={num_prefix_tokens}: it must be 0 or more.")

    def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim == 4:
            return tokens
        if tokens.ndim != 3:
            raise ValueError(
                f"Expected ViT tokens (B, N, C) or a feature map (B, C, H, W), got shape {tuple(tokens.shape)}."
            )
        token_count = tokens.shape[1]
        prefix = num_prefix_tokens
        if prefix is None:
            side = math.isqrt(token_count)
            prefix = token_count - side * side
        height, width = grid_size if grid_size is not None else (math.isqrt(token_count - prefix),) * 2
        if prefix >= token_count or token_count - prefix != height * width:
            raise ValueError(
                f"Cannot lay out {token_count} tokens as {prefix} prefix tokens and a {height} x {width} patch grid. "
                "Pass num_prefix_tokens and grid_size to vit_reshape_transform."
            )
        patches = tokens[:, prefix:, :]
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return tokens_to_map


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each map of a ``(B, H, W)`` stack to [0, 1] after clipping negative values to 0.

    Maps that are constant after clipping (including all-negative maps) become all zeros, and NaN or
    infinite values become 0, so the result is always finite. Returns float32.
    """
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    maps = np.maximum(maps, 0.0)
    lowest = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lowest
    varying = span > CONSTANT_MAP_RANGE
    scaled = (maps - lowest) / np.where(varying, span, 1.0)
    return np.clip(np.where(varying, scaled, 0.0), 0.0, 1.0).astype(np.float32)


class Explainer:
    """Compute class activation maps for batches of images with one pytorch-grad-cam CAM object.

    Use it as a context manager. Entering it registers the CAM's forward hooks on ``target_layer``, and
    leaving it removes them, also when the block raises.

    Args:
        model: maps images ``(B, 3, H, W)`` to the output the targets score, one row per image.
        target_layer: the module whose output activations are explained, usually the last conv activation.
        method: one of ``CAM_METHODS``.
        reshape_transform: turns the target layer's output into ``(B, C, h, w)``. The default,
            ``vit_reshape_transform()``, passes feature maps through and lays out ViT tokens on a square grid.
        batch_size: images per CAM pass. Larger batches are faster and hold more activations in memory.

    Attributes:
        last_outputs: the model outputs of the last ``explain`` call, ``(B, ...)`` on the CPU, such as the
            logits whose highest entry a ``None`` target explained.

    Entering the block puts ``model`` in eval mode (pytorch-grad-cam does so), and it stays there.

    NOTE: while the block is open, every forward pass through ``target_layer`` runs the CAM's hooks,
    which keep a copy of the activations until the next ``explain`` call. Compute embeddings and other
    outputs before the block or after it.

    NOTE: the tests run on the CPU only. On CUDA, pytorch-grad-cam moves the images to the device of
    the model's first parameter, and the maps come back as numpy arrays.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module,
        method: str = DEFAULT_METHOD,
        reshape_transform: ReshapeTransform | None = None,
        batch_size: int = 16,
    ) -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"Unknown CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size={batch_size}: it must be at least 1.")
        self.model = model
        self.target_layer = target_layer
        self.method = method
        self.reshape_transform = reshape_transform if reshape_transform is not None else vit_reshape_transform()
        self.batch_size = batch_size
        self.last_outputs: torch.Tensor | None = None
        self._cam: BaseCAM | None = None
        self._copy_hook: torch.utils.hooks.RemovableHandle | None = None

    @classmethod
    def for_classes(
        cls, backbone: FrozenBackbone, head: nn.Module, method: str = DEFAULT_METHOD, batch_size: int = 16
    ) -> "Explainer":
        """Explain the head's class logits at the backbone's registered target layer."""
        return cls(ClassScoreModel(backbone, head), backbone.target_layer(), method, batch_size=batch_size)

    @classmethod
    def for_similarity(
        cls, backbone: FrozenBackbone, method: str = DEFAULT_METHOD, batch_size: int = 16
    ) -> "Explainer":
        """Explain retrieval similarities (the pooled embedding) at the backbone's registered target layer."""
        return cls(EmbeddingModel(backbone), backbone.target_layer(), method, batch_size=batch_size)

    def __enter__(self) -> "Explainer":
        if self._cam is not None:
            raise RuntimeError("This Explainer is already open: enter its with block only once at a time.")
        self._cam = CAM_METHODS[self.method](
            model=self.model, target_layers=[self.target_layer], reshape_transform=self.reshape_transform
        )
        # Registered after the CAM's own hooks, this hook hands a copy of the target's output to the
        # rest of the network. An in-place operation further on (an inplace ReLU, ``x += ...``) then
        # changes the copy, while the activations the CAM stored and the tensor that autograd saved for
        # the target's backward pass stay intact.
        self._copy_hook = self.target_layer.register_forward_hook(_copy_output)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # BaseCAM.__exit__ would print and swallow an IndexError (grad-cam 1.5.7), so the hooks are released
        # directly and every exception propagates.
        self.close()

    def close(self) -> None:
        """Remove the hooks from the target layer. Calling it again does nothing."""
        if self._copy_hook is not None:
            self._copy_hook.remove()
            self._copy_hook = None
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def explain(self, images: torch.Tensor, targets: Sequence[Target] | None = None) -> np.ndarray:
        """Compute one map per image, ``(B, H, W)`` float32 in [0, 1] at the input resolution.

        Args:
            images: ``(B, 3, H, W)`` preprocessed images. They are not modified.
            targets: one target per image, such as ``ClassTarget`` or ``SimilarityTarget``. ``None``
                explains the highest logit of each image, which only makes sense for class logits.

        Raises:
            RuntimeError: called outside the ``with`` block.
            ValueError: ``images`` is not a 4-D batch, or ``targets`` has another length than the batch.
        """
        if self._cam is None:
            raise RuntimeError("Explainer.explain was called outside its with block: use `with Explainer(...) as e:`.")
        if images.ndim != 4:
            raise ValueError(f"Expected images (B, 3, H, W), got shape {tuple(images.shape)}.")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"Got {len(targets)} targets for {len(images)} images: pass one target per image.")

        cam = self._cam
        maps, outputs = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            chunk_targets = None if targets is None else list(targets[start : start + self.batch_size])
            chunk_maps, chunk_outputs = self._explain_chunk(cam, chunk, chunk_targets)
            maps.append(chunk_maps)
            outputs.append(chunk_outputs)
        self.last_outputs = torch.cat(outputs) if outputs else None
        if not maps:
            return np.zeros((0, *images.shape[2:]), dtype=np.float32)
        return normalize_maps(np.concatenate(maps))

    @staticmethod
    def _explain_chunk(
        cam: BaseCAM, images: torch.Tensor, targets: list[Target] | None
    ) -> tuple[np.ndarray, torch.Tensor]:
        # The backbone is frozen, so only an input that requires gradients makes the target's activations
        # require them. Without it, the CAM registers no gradient hook and the backward pass fails.
        # The copy also keeps the caller's tensor unchanged.
        with torch.inference_mode(False), torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            maps = cam(input_tensor=inputs, targets=targets)
        outputs = cam.outputs.detach().cpu()
        # The CAM keeps the last outputs, and with them the autograd graph that backward retained.
        cam.outputs = None
        return maps, outputs


def _copy_output(module: nn.Module, inputs: Any, output: Any) -> Any:
    return output.clone() if isinstance(output, torch.Tensor) else None
