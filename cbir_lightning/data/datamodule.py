"""A LightningDataModule over an image folder (one sub-folder per class) with a stable per-class split.

Training reads features, not pixels: the caller extracts each split's features once with the frozen
backbone (through the feature cache) and hands them over with :meth:`set_features`.
"""

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS
from cbir_lightning.data.folder import FolderScan, ImageRecord, scan_image_folder, write_skipped_csv
from cbir_lightning.data.split import SPLIT_NAMES, split_records, write_split_csv

log = logging.getLogger(__name__)

__all__ = ["DATA_ENV_VAR", "ImageFolderDataModule", "resolve_data_root"]

DATA_ENV_VAR = "CBIR_DATA"
# Tried in order, first relative to the working directory, then to the repository checkout.
DEFAULT_ROOTS = ("data/corel-1k", "../shared/data/corel-1k")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the image-folder root: ``root`` if given, else ``$CBIR_DATA``, else the first default that exists.

    Raises:
        FileNotFoundError: no root was given and no default location exists; the message lists them.
    """
    if root:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV_VAR):
        return Path(os.environ[DATA_ENV_VAR]).expanduser()
    candidates = [base / default for base in (Path.cwd(), PROJECT_ROOT) for default in DEFAULT_ROOTS]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"No image folder found (tried {tried}). Set data.root=/path/to/images or the {DATA_ENV_VAR} "
        f"environment variable; the folder must contain one sub-folder per class."
    )


class ImageFolderDataModule(pl.LightningDataModule):
    """Scan, split and serve an image folder.

    Args:
        root: the folder with one sub-folder per class; ``None`` resolves it with :func:`resolve_data_root`.
        fractions: train, val and test fractions of each class.
        split_seed: seed of the split; the same seed puts the same file in the same split on every machine.
        batch_size: batch size of all data loaders.
        max_pixels: images with more pixels are skipped (a decompression-bomb guard); ``None`` disables it.
        show_progress: show a progress bar while scanning.
    """

    def __init__(
        self,
        root: str | None = None,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        batch_size: int = 32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        self.root = resolve_data_root(root)
        self.fractions = tuple(float(fraction) for fraction in fractions)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.show_progress = show_progress
        self.folder: FolderScan | None = None
        self.splits: dict[str, list[ImageRecord]] = {}
        self.features: dict[str, torch.Tensor] = {}

    @property
    def class_names(self) -> list[str]:
        """The class names, indexed by label."""
        return self._scanned().class_names

    def scan(self) -> FolderScan:
        """Scan the folder and split it; later calls return the first result."""
        if self.folder is None:
            folder = scan_image_folder(self.root, self.max_pixels, self.show_progress)
            if len(folder.class_names) < 2:
                raise ValueError(
                    f"{folder.root} has {len(folder.class_names)} class folder(s) ({', '.join(folder.class_names)}); "
                    f"a classifier needs at least 2. Add class folders or point data.root at another folder."
                )
            self.splits = split_records(folder.records, self.fractions, self.split_seed)
            _check_splits_not_empty(self.splits, self.fractions)
            self.folder = folder
            counts = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLIT_NAMES)
            log.info(
                "%s: %d classes, %d images (%s), %d skipped",
                self.root,
                len(self.folder.class_names),
                len(self.folder.records),
                counts,
                len(self.folder.skipped),
            )
        return self.folder

    def write_manifests(self, run_dir: Path) -> None:
        """Write ``split.csv`` and ``skipped.csv`` into ``run_dir``."""
        folder = self._scanned()
        write_split_csv(self.splits, run_dir / "split.csv")
        write_skipped_csv(folder.skipped, run_dir / "skipped.csv")

    def set_features(self, features: dict[str, torch.Tensor]) -> None:
        """Provide each split's features, one row per record of ``self.splits[split]`` in order."""
        for name in SPLIT_NAMES:
            if len(features[name]) != len(self.splits[name]):
                expected = len(self.splits[name])
                raise ValueError(f"Got {len(features[name])} feature rows for the {name} split of {expected} images.")
        self.features = dict(features)

    def labels(self, split: str) -> torch.Tensor:
        """Return the class labels of a split, in record order."""
        return torch.tensor([record.label for record in self.splits[split]], dtype=torch.long)

    def train_dataloader(self) -> DataLoader:
        # The shuffle order comes from the global RNG, which the run's ``seed`` sets.
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=self.batch_size)

    def _dataset(self, split: str) -> TensorDataset:
        if not self.features:
            raise RuntimeError("No features yet: call set_features() with each split's features before training.")
        return TensorDataset(self.features[split], self.labels(split))

    def _scanned(self) -> FolderScan:
        return self.folder if self.folder is not None else self.scan()


def _check_splits_not_empty(splits: dict[str, list[ImageRecord]], fractions: tuple[float, ...]) -> None:
    for name in ("train", "test"):
        if not splits[name]:
            sizes = ", ".join(f"{split} {len(records)}" for split, records in splits.items())
            raise ValueError(
                f"The {name} split is empty ({sizes}) with data.fractions={list(fractions)}: the classes have too "
                f"few images. Add images or raise the {name} fraction."
            )
