"""An on-disk cache of frozen-backbone features, keyed by backbone, weights, preprocessing and image content.

A frozen backbone maps the same image bytes to the same features, so each image goes through the
backbone once per (backbone, weights, preprocessing, pooling). Head training, evaluation and retrieval
then read the cache. Layout::

    <cache_dir>/features/<backbone>-<key digest>/key.json
    <cache_dir>/features/<backbone>-<key digest>/<sha256[:2]>/<sha256>.safetensors

Each entry is written to a temporary file and renamed, so an interrupted run leaves no partial entry.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from cbir_lightning.data.folder import ImageRecord
from cbir_lightning.data.transforms import Preprocessing
from cbir_lightning.features.inference import check_precision, iterate_features
from cbir_lightning.models.backbone import FrozenBackbone

log = logging.getLogger(__name__)

__all__ = ["FEATURE_FORMAT_VERSION", "CacheStats", "FeatureCache", "FeatureKey"]

FEATURE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureKey:
    """Everything besides the image bytes that determines a cached feature vector."""

    backbone: str
    weights_id: str
    preprocess_id: str
    pool: str
    # The code that turns bytes into features: bump FEATURE_FORMAT_VERSION when decoding or the
    # weight converters change, so that old entries are no longer read.
    code_version: str = field(default_factory=lambda: f"{FEATURE_FORMAT_VERSION}:timm-{timm.__version__}")
    # Forward-pass precision, "fp32" or "bf16" (bfloat16 autocast), because bf16 changes the features.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def digest(self) -> str:
        """Return a short, stable hash of the key."""
        fields = asdict(self)
        if self.precision == "fp32":
            # fp32 keys hash as they did before the precision field existed, so their entries stay valid.
            del fields["precision"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CacheStats:
    """Counts from the last :meth:`FeatureCache.extract` call."""

    cached: int = 0  # distinct image contents whose features were read from disk
    computed: int = 0  # distinct image contents that went through the backbone


class FeatureCache:
    """Features of one backbone configuration, stored per image content hash."""

    def __init__(self, cache_dir: Path | str, key: FeatureKey) -> None:
        self.key = key
        self.directory = Path(cache_dir) / "features" / f"{key.backbone}-{key.digest()}"
        self.stats = CacheStats()

    def entry_path(self, sha256: str) -> Path:
        """Return where the features of the image with this content hash are stored."""
        return self.directory / sha256[:2] / f"{sha256}.safetensors"

    def extract(
        self,
        records: Sequence[ImageRecord],
        backbone: FrozenBackbone,
        preprocessing: Preprocessing,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int | None = None,
        show_progress: bool = True,
        channels_last: bool = True,
        precision: str | None = None,
    ) -> torch.Tensor:
        """Return the features of ``records`` as a ``(len(records), dim)`` float32 tensor, in record order.

        Images missing from the cache go through ``backbone`` once, in batches under
        ``torch.inference_mode()``; records that share a content hash share one computation.
        ``channels_last`` and ``precision`` are the options of ``iterate_features``. ``precision=None``
        uses ``self.key.precision``, and any other value must equal it.

        Raises:
            ValueError: ``precision`` differs from ``self.key.precision``.
        """
        if precision is not None and precision != self.key.precision:
            raise ValueError(
                f"Invalid precision={precision!r} for a feature cache with key precision {self.key.precision!r}. "
                f"Open the cache with FeatureKey(..., precision={precision!r}) to store {precision} features."
            )
        self._write_key_file()
        missing = self._missing_entries(records)
        self.stats = CacheStats(cached=len({record.sha256 for record in records}) - len(missing))
        if missing:
            log.info(
                "Extracting %s features for %d images (%d read from the cache in %s)",
                self.key.backbone,
                len(missing),
                self.stats.cached,
                self.directory,
            )
            self._compute(
                missing, backbone, preprocessing, batch_size, num_workers, max_pixels, show_progress, channels_last
            )
            self.stats.computed = len(missing)
        else:
            log.info("All %d %s features read from the cache %s", len(records), self.key.backbone, self.directory)
        return torch.stack([load_file(str(self.entry_path(record.sha256)))["features"] for record in records])

    def _write_key_file(self) -> None:
        key_file = self.directory / "key.json"
        if not key_file.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(key_file, json.dumps(asdict(self.key), indent=2))

    def _missing_entries(self, records: Sequence[ImageRecord]) -> dict[str, Path]:
        missing: dict[str, Path] = {}
        for record in records:
            if record.sha256 not in missing and not self.entry_path(record.sha256).exists():
                missing[record.sha256] = record.path
        return missing

    def _compute(
        self,
        missing: dict[str, Path],
        backbone: FrozenBackbone,
        preprocessing: Preprocessing,
        batch_size: int,
        num_workers: int,
        max_pixels: int | None,
        show_progress: bool,
        channels_last: bool,
    ) -> None:
        hashes = list(missing)
        batches = iterate_features(
            list(missing.values()),
            backbone,
            preprocessing,
            batch_size,
            num_workers,
            max_pixels,
            channels_last,
            self.key.precision,
            progress_description=f"Features ({self.key.backbone})" if show_progress else None,
        )
        start = 0
        for features in batches:
            for offset, row in enumerate(features):
                self._save_entry(hashes[start + offset], row)
            start += len(features)

    def _save_entry(self, sha256: str, features: torch.Tensor) -> None:
        path = self.entry_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"features": features.clone()}, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)
