"""Image embeddings for retrieval: average-pooled frozen-backbone features, read through the feature cache.

Contract of every embedding that this module returns:

- shape ``(N, D)`` for ``N`` images, or ``(D,)`` for a single query image, where ``D`` is the channel
  count of the backbone's final feature map;
- dtype ``torch.float32``, on the CPU, in the order of the input;
- RAW features: global average pooling of the final feature map, not L2-normalised. The search backends
  in ``cbir_lightning.retrieval.search`` normalise them for the cosine metric and use them as they are
  for the euclidean metric.

The features are read from and written to the same ``FeatureCache`` entries as a training run with
``head.pool=avg``, so images that a training run has already seen do not go through the backbone again.
"""

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, load_rgb_image
from cbir_lightning.data.folder import ImageRecord
from cbir_lightning.data.transforms import Preprocessing, PreprocessMode, build_preprocessing
from cbir_lightning.features.cache import FeatureCache, FeatureKey
from cbir_lightning.features.inference import check_precision
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.utils.paths import default_cache_dir

log = logging.getLogger(__name__)

__all__ = ["Embedder", "HashedImage", "build_embedder"]

RETRIEVAL_POOL = "avg"


class HashedImage(Protocol):
    """An image file with the SHA-256 of its bytes, such as an ``ImageRecord``."""

    @property
    def path(self) -> Path: ...

    @property
    def sha256(self) -> str: ...


class Embedder:
    """Compute retrieval embeddings with a frozen backbone, reusing the on-disk feature cache.

    The cache key is ``FeatureKey(backbone.spec.name, backbone.weights_id, preprocessing.preprocess_id,
    "avg", precision=precision)``, which for ``fp32`` is the key that training uses with ``head.pool=avg``.
    Features are computed on the device of ``backbone``'s parameters. ``channels_last`` and ``precision``
    are the options of ``cbir_lightning.features.inference.iterate_features``.
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        preprocessing: Preprocessing,
        cache_dir: Path | str,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        show_progress: bool = True,
        channels_last: bool = True,
        precision: str = "fp32",
    ) -> None:
        if backbone.pool != RETRIEVAL_POOL:
            raise ValueError(
                f"Retrieval embeddings need a backbone with pool={RETRIEVAL_POOL!r}, got pool={backbone.pool!r}. "
                f"Build the backbone with build_backbone(..., pool={RETRIEVAL_POOL!r})."
            )
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size={batch_size}: it must be at least 1.")
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.key = FeatureKey(
            backbone.spec.name, backbone.weights_id, preprocessing.preprocess_id, backbone.pool, precision=precision
        )
        self.cache = FeatureCache(cache_dir, self.key)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_pixels = max_pixels
        self.show_progress = show_progress
        self.channels_last = channels_last
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``, found with one forward pass of a blank image on first use."""
        if self._dim is None:
            device = next(self.backbone.parameters()).device
            blank = torch.zeros(1, *self.preprocessing.input_size, device=device)
            self.backbone.eval()
            with torch.inference_mode():
                self._dim = int(self.backbone(blank).shape[1])
        return self._dim

    def embed_records(self, records: Sequence[HashedImage]) -> torch.Tensor:
        """Return the ``(len(records), D)`` float32 embeddings of ``records``, in order.

        Only ``path`` and ``sha256`` of each record are read. Contents missing from the feature cache go
        through the backbone in batches under ``torch.inference_mode()``, with a progress bar when
        ``show_progress`` is set.
        """
        if not records:
            return torch.empty(0, self.dim, dtype=torch.float32)
        # FeatureCache.extract reads only .path and .sha256, which every HashedImage has.
        features = self.cache.extract(
            records,  # type: ignore[arg-type]
            self.backbone,
            self.preprocessing,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_pixels=self.max_pixels,
            show_progress=self.show_progress,
            channels_last=self.channels_last,
        )
        self._dim = int(features.shape[1])
        return features.float()

    def embed_image(self, path: Path | str) -> torch.Tensor:
        """Return the ``(D,)`` float32 embedding of one image file, cached under the SHA-256 of its bytes.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            UnusableImageError: the file cannot be decoded as an image.
        """
        path = Path(path).expanduser().resolve()
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise FileNotFoundError(f"Query image not found: {path}") from None
        if not self.cache.entry_path(digest).exists():
            # Decoding here, rather than in the cache's data loader, raises UnusableImageError itself even
            # when num_workers > 0, where the loader would re-raise it as another exception type.
            load_rgb_image(path, self.max_pixels)
        record = ImageRecord(path=path, relpath=path.name, class_name="", label=-1, sha256=digest)
        return self.embed_records([record])[0]


def build_embedder(
    backbone: str,
    weights_source: str = "auto",
    weights_path: str | None = None,
    preprocess: PreprocessMode = "model",
    cache_dir: Path | str | None = None,
    init_seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
    channels_last: bool = True,
    precision: str = "fp32",
) -> Embedder:
    """Build a registered backbone with average pooling, its preprocessing and the feature cache.

    The arguments mean what the training options of the same names mean (``backbone.name``,
    ``weights.source``, ``weights.path``, ``preprocess``, ``features.cache_dir``, ``weights.init_seed``),
    so an embedder built with the same values reads the features that a training run cached.
    ``cache_dir=None`` uses ``$CBIR_CACHE_DIR``, else ``~/.cache/cbir_lightning``. ``precision="bf16"``
    computes the features under bfloat16 autocast, which is faster on CPUs with bfloat16 instructions
    (AVX512-BF16, AMX), and caches them apart from the fp32 features.

    Raises:
        ValueError: unknown backbone name, preprocessing mode or precision.
        WeightsUnavailableError: the weights cannot be obtained from ``weights_source``.
    """
    check_precision(precision)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model = build_backbone(backbone, weights_source, weights_path, RETRIEVAL_POOL, init_seed, cache_dir)
    preprocessing = build_preprocessing(model.model, preprocess)
    model.to(device)
    return Embedder(
        model, preprocessing, cache_dir, batch_size, num_workers, max_pixels, show_progress, channels_last, precision
    )
