"""Scanning of an image folder laid out as ``<root>/<class>/<image>`` into checked, hashed records."""

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, UnusableImageError, load_rgb_image
from cbir_lightning.utils.progress import track

log = logging.getLogger(__name__)

_DIGIT_RUN = re.compile(r"([0-9]+)")


@dataclass(frozen=True)
class ImageRecord:
    """One usable image of a scanned folder."""

    path: Path
    """Absolute path of the file."""
    relpath: str
    """POSIX path relative to the scanned root, such as ``horses/712.jpg``."""
    class_name: str
    label: int
    """Index of ``class_name`` in ``FolderScan.class_names``."""
    sha256: str
    """SHA-256 of the file bytes, in lowercase hex."""


@dataclass(frozen=True)
class SkippedFile:
    """A file in a class folder that could not be used, with the reason."""

    path: Path
    reason: str


@dataclass(frozen=True)
class FolderScan:
    """Result of ``scan_image_folder``."""

    root: Path
    """Scanned folder, as an absolute path with symbolic links resolved."""
    class_names: list[str]
    """Class folder names, sorted. A record's ``label`` is the index in this list."""
    records: list[ImageRecord]
    """Usable images, in ``record_sort_key`` order."""
    skipped: list[SkippedFile]


def natural_sort_key(text: str) -> tuple[tuple[str | int, ...], str]:
    """Return a sort key that orders digit runs by value, so that ``"2.jpg"`` sorts before ``"10.jpg"``.

    Letters compare without case first, and the text itself breaks ties such as ``"02"`` and ``"2"``.
    """
    parts = _DIGIT_RUN.split(text)
    # re.split with a capturing group puts the digit runs at the odd indices.
    key = tuple(int(part) if index % 2 else part.casefold() for index, part in enumerate(parts))
    return key, text


def record_sort_key(record: ImageRecord) -> tuple[str, tuple[tuple[str | int, ...], str]]:
    """Return the key of the record order: class name, then ``natural_sort_key`` of the relative path."""
    return record.class_name, natural_sort_key(record.relpath)


def scan_image_folder(
    root: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS, show_progress: bool = True
) -> FolderScan:
    """Find, decode and hash every image of a folder with one sub-folder per class.

    Images in nested folders inside a class folder belong to that class. Each file is fully decoded with
    ``load_rgb_image``, so truncated files show up now rather than during training. An unusable file is
    logged as a warning and listed in ``FolderScan.skipped``. Names starting with ``"."`` are ignored,
    and so are files directly in ``root`` (such as a README or checksum list).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: ``root`` has no class folder, or a class folder has no usable image.
    """
    root = _resolve_root(root)
    class_dirs = _find_class_dirs(root)
    class_names = [class_dir.name for class_dir in class_dirs]
    candidates = [
        (label, class_dir.name, path)
        for label, class_dir in enumerate(class_dirs)
        for path in _list_visible_files(class_dir)
    ]

    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    for label, class_name, path in track(candidates, f"Scanning {root.name}", enabled=show_progress):
        try:
            records.append(_read_record(root, path, class_name, label, max_pixels))
        except _UnusableFileError as error:
            log.warning("Skipping %s: %s", path, error.reason)
            skipped.append(SkippedFile(path=path, reason=error.reason))

    _check_every_class_has_images(class_dirs, records, skipped)
    records.sort(key=record_sort_key)
    skipped.sort(key=lambda item: natural_sort_key(item.path.relative_to(root).as_posix()))
    log.info(
        "Scanned %s: %d images in %d classes, %d files skipped",
        root,
        len(records),
        len(class_names),
        len(skipped),
    )
    return FolderScan(root=root, class_names=class_names, records=records, skipped=skipped)


def write_skipped_csv(skipped: list[SkippedFile], path: Path) -> None:
    """Write the skipped files as CSV with the header ``path,reason``, also when there are none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "reason"])
        for item in skipped:
            writer.writerow([str(item.path), item.reason])


_LAYOUT_HINT = "Pass a folder laid out as <root>/<class>/<image>, for example data/corel-1k/horses/712.jpg."


def _resolve_root(root: Path | str) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Image folder not found: {root}. {_LAYOUT_HINT}")
    if not root.is_dir():
        raise NotADirectoryError(f"Image folder {root} is a file, not a folder. {_LAYOUT_HINT}")
    return root.resolve()


def _find_class_dirs(root: Path) -> list[Path]:
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_dirs.append(entry)
        else:
            log.debug("Ignoring %s: files directly in the image folder belong to no class", entry)
    if not class_dirs:
        raise ValueError(f"Image folder {root} contains no class folder. {_LAYOUT_HINT}")
    return class_dirs


def _list_visible_files(class_dir: Path) -> list[Path]:
    """List the files under ``class_dir`` at any depth, skipping names that start with ``"."``."""
    files = []
    for folder, dir_names, file_names in os.walk(class_dir):
        # Pruning dir_names in place stops os.walk from entering hidden folders.
        dir_names[:] = [name for name in dir_names if not name.startswith(".")]
        files.extend(Path(folder, name) for name in file_names if not name.startswith("."))
    return files


class _UnusableFileError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_record(root: Path, path: Path, class_name: str, label: int, max_pixels: int | None) -> ImageRecord:
    """Hash and decode one file, raising ``_UnusableFileError`` when it cannot be read or decoded."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        load_rgb_image(path, max_pixels=max_pixels)
    except UnusableImageError as error:
        raise _UnusableFileError(error.reason) from error
    except OSError as error:
        raise _UnusableFileError(f"cannot read file: {error.strerror or error}") from error
    return ImageRecord(
        path=path,
        relpath=path.relative_to(root).as_posix(),
        class_name=class_name,
        label=label,
        sha256=digest,
    )


def _check_every_class_has_images(
    class_dirs: list[Path], records: list[ImageRecord], skipped: list[SkippedFile]
) -> None:
    classes_with_images = {record.class_name for record in records}
    empty_dirs = [class_dir for class_dir in class_dirs if class_dir.name not in classes_with_images]
    if not empty_dirs:
        return
    lines = []
    for class_dir in empty_dirs:
        skipped_count = sum(1 for item in skipped if item.path.is_relative_to(class_dir))
        lines.append(f"  {class_dir} ({skipped_count} files skipped)")
    raise ValueError(
        "These class folders contain no usable image, so they would have no examples. Add images or "
        "remove the folders, and see the warnings above for the skipped files:\n" + "\n".join(lines)
    )
