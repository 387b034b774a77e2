"""Stratified train/val/test split that puts each file in the same split on every run and machine."""

import csv
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from cbir_lightning.data.folder import ImageRecord, record_sort_key

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

_FRACTION_SUM_TOLERANCE = 1e-6


def split_records(
    records: Sequence[ImageRecord],
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[ImageRecord]]:
    """Split the records of each class into train, val and test by the given fractions.

    Each class is ordered by the SHA-256 of ``f"{seed}:{relpath}"``, so a file's split depends only on
    the seed, its relative path and the file count of its class. It does not depend on the input order,
    Python's hash randomisation, the numpy version or the other classes. Per class of ``n`` files,
    ``round(test_fraction * n)`` go to test, ``round(val_fraction * n)`` to val and the rest to train,
    with Python's ``round`` (halves go to the even number). 100 files with the default fractions give
    70/10/20.

    Returns:
        A list per name in ``SPLIT_NAMES``, in ``record_sort_key`` order.

    Raises:
        ValueError: the fractions are negative or do not sum to 1, two records share a relative path,
            or a class would have no training image.
    """
    _check_fractions(fractions)
    _check_unique_relpaths(records)
    _, val_fraction, test_fraction = fractions

    splits: dict[str, list[ImageRecord]] = {name: [] for name in SPLIT_NAMES}
    for class_name, class_records in sorted(_group_by_class(records).items()):
        ordered = sorted(class_records, key=lambda record: _split_hash(seed, record.relpath))
        test_count = round(test_fraction * len(ordered))
        val_count = round(val_fraction * len(ordered))
        train_count = len(ordered) - test_count - val_count
        if train_count < 1:
            raise ValueError(
                f"Class {class_name!r} has {len(ordered)} images, which leaves none for training with "
                f"fractions {fractions}: add images to it or lower the val and test fractions."
            )
        splits["test"].extend(ordered[:test_count])
        splits["val"].extend(ordered[test_count : test_count + val_count])
        splits["train"].extend(ordered[test_count + val_count :])

    for name in SPLIT_NAMES:
        splits[name].sort(key=record_sort_key)
    log.info("Split %d images: %s", len(records), ", ".join(f"{name} {len(splits[name])}" for name in splits))
    return splits


def write_split_csv(splits: dict[str, list[ImageRecord]], path: Path) -> None:
    """Write one CSV row per record with the header ``path,class,split``, in ``record_sort_key`` order.

    The path column contains the relative path of the record.
    """
    rows = [(record, name) for name, split in splits.items() for record in split]
    rows.sort(key=lambda row: record_sort_key(row[0]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "class", "split"])
        for record, name in rows:
            writer.writerow([record.relpath, record.class_name, name])


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != len(SPLIT_NAMES):
        raise ValueError(f"Expected 3 fractions for {SPLIT_NAMES}, got {len(fractions)}: {fractions}.")
    if any(not math.isfinite(value) or value < 0 for value in fractions):
        raise ValueError(f"Split fractions must be finite and not negative, got {fractions}.")
    total = sum(fractions)
    if abs(total - 1.0) > _FRACTION_SUM_TOLERANCE:
        raise ValueError(f"Split fractions must sum to 1, got {fractions} with sum {total}.")


def _check_unique_relpaths(records: Sequence[ImageRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.relpath in seen:
            raise ValueError(f"Two records have the relative path {record.relpath!r}. Pass each file once.")
        seen.add(record.relpath)


def _group_by_class(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(record.class_name, []).append(record)
    return groups


def _split_hash(seed: int, relpath: str) -> str:
    return hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()
