"""A persistent retrieval index of a gallery folder: raw embeddings, per-image metadata and a manifest.

Layout of an index folder::

    <index_dir>/manifest.json                       embedding configuration, counts, times, data file names
    <index_dir>/embeddings-<version>.safetensors    tensor "embeddings": (N, D) float32, one row per image
    <index_dir>/images-<version>.json               per row: stable id, relative path, SHA-256, class label
    <index_dir>/.lock                               locked while a process writes the index

A build writes the data files of a new version under new names, then replaces ``manifest.json`` with
``os.replace``, which is atomic. Until that rename, ``manifest.json`` still names the previous data files,
which stay on disk, so a build that crashes or is killed leaves the previous index readable. Each build
deletes the data files that its manifest does not name, including those left by an interrupted build,
and touches no file whose name it did not write. A build refuses a folder inside the gallery (unless its
name starts with ".") and a folder that contains other files but no index.

Updates are incremental by content: an image whose SHA-256 is already in the index keeps its vector,
whatever its path, so renamed and duplicated files need no backbone pass. Only new contents go to the
embedder, which itself reads the feature cache first.

NOTE: the write lock uses ``fcntl.flock``, so building and updating an index work on POSIX systems only.
"""

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, UnusableImageError, load_rgb_image
from cbir_lightning.data.folder import SkippedFile, natural_sort_key, scan_image_folder
from cbir_lightning.retrieval.embed import Embedder
from cbir_lightning.retrieval.search import Metric, SearchBackend, build_backend
from cbir_lightning.utils.progress import track

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_FORMAT_VERSION",
    "GalleryImage",
    "GalleryIndex",
    "GalleryScan",
    "IndexChanges",
    "IndexManifest",
    "IndexedImage",
    "scan_gallery",
]

INDEX_FORMAT = "cbir-lightning-gallery-index"
INDEX_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
_EMBEDDINGS_PREFIX = "embeddings-"
_IMAGES_PREFIX = "images-"
_TEMPORARY_SUFFIX = ".tmp"
_MANIFEST_TEMPORARY_PREFIX = "manifest-"
# The parts of the embedding configuration that must match before two vectors can be compared.
_KEY_FIELDS = ("backbone", "weights_id", "preprocess_id", "pool", "precision")
_OPEN_ATTEMPTS = 3
_LOCK_POLL_SECONDS = 0.5
# Names of the files that a build writes, and so may delete: data files of a version (12 hex digits) and
# the temporary manifest. Anything else in the folder is left alone.
# Earlier versions named the temporary manifest tmp<8 characters>.tmp, mkstemp's default.
_INDEX_FILE_PATTERN = re.compile(
    rf"({_EMBEDDINGS_PREFIX}[0-9a-f]{{12}}\.safetensors|{_IMAGES_PREFIX}[0-9a-f]{{12}}\.json|"
    rf"{_MANIFEST_TEMPORARY_PREFIX}\w+{re.escape(_TEMPORARY_SUFFIX)}|tmp\w{{8}}{re.escape(_TEMPORARY_SUFFIX)})"
)
REBUILD_HINT = (
    "Rebuild the index with index.rebuild=true on the command line, or GalleryIndex.build(..., rebuild=True)."
)

GalleryLayout = Literal["auto", "classes", "flat"]
GALLERY_LAYOUTS: tuple[str, ...] = ("auto", "classes", "flat")


# ---------------------------------------------------------------------------------------------------------
# Scanning a gallery folder


@dataclass(frozen=True)
class GalleryImage:
    """One usable image of a scanned gallery folder."""

    path: Path
    """Absolute path of the file."""
    relpath: str
    """POSIX path relative to the gallery root."""
    sha256: str
    """SHA-256 of the file bytes, in lowercase hex."""
    class_name: str | None
    """Class folder name, or ``None`` in a flat gallery."""
    label: int | None
    """Index of ``class_name`` in ``GalleryScan.class_names``, or ``None`` in a flat gallery."""


@dataclass(frozen=True)
class GalleryScan:
    """Result of ``scan_gallery``."""

    root: Path
    layout: Literal["classes", "flat"]
    class_names: list[str] | None
    """Sorted class folder names, or ``None`` in a flat gallery."""
    images: list[GalleryImage]
    """Usable images, sorted by class name and then by natural order of the relative path."""
    skipped: list[SkippedFile]


def scan_gallery(
    root: Path | str,
    layout: GalleryLayout = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> GalleryScan:
    """Find, decode and hash the images of a gallery folder.

    ``classes`` reads ``<root>/<class>/<image>`` with ``scan_image_folder``, which ignores files directly in
    ``root``. ``flat`` reads only the files directly in ``root`` and gives them no class. ``auto`` picks
    ``classes`` when ``root`` has a sub-folder whose name does not start with ``"."``, else ``flat``.
    Unusable files are logged as warnings and listed in ``GalleryScan.skipped``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: unknown layout, no usable image, or (``classes``) a class folder with no usable image.
    """
    if layout not in GALLERY_LAYOUTS:
        raise ValueError(f"Invalid gallery layout {layout!r}. Choose one of: {', '.join(GALLERY_LAYOUTS)}.")
    root = _resolve_gallery_root(root)
    if layout == "auto":
        layout = "classes" if _visible_entries(root, folders=True) else "flat"
    if layout == "classes":
        return _scan_class_gallery(root, max_pixels, show_progress)
    return _scan_flat_gallery(root, max_pixels, show_progress)


def _resolve_gallery_root(root: Path | str) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Gallery folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"Gallery folder {root} is a file, not a folder.")
    return root.resolve()


def _visible_entries(root: Path, folders: bool) -> list[Path]:
    return [
        entry
        for entry in sorted(root.iterdir())
        if not entry.name.startswith(".") and (entry.is_dir() if folders else entry.is_file())
    ]


def _scan_class_gallery(root: Path, max_pixels: int | None, show_progress: bool) -> GalleryScan:
    scan = scan_image_folder(root, max_pixels=max_pixels, show_progress=show_progress)
    images = [
        GalleryImage(record.path, record.relpath, record.sha256, record.class_name, record.label)
        for record in scan.records
    ]
    return GalleryScan(scan.root, "classes", scan.class_names, images, scan.skipped)


def _scan_flat_gallery(root: Path, max_pixels: int | None, show_progress: bool) -> GalleryScan:
    images: list[GalleryImage] = []
    skipped: list[SkippedFile] = []
    for path in track(_visible_entries(root, folders=False), f"Scanning {root.name}", enabled=show_progress):
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            load_rgb_image(path, max_pixels=max_pixels)
        except UnusableImageError as error:
            reason = error.reason
        except OSError as error:
            reason = f"cannot read file: {error.strerror or error}"
        else:
            images.append(GalleryImage(path, path.name, digest, None, None))
            continue
        log.warning("Skipping %s: %s", path, reason)
        skipped.append(SkippedFile(path=path, reason=reason))

    if not images:
        raise ValueError(
            f"Gallery folder {root} contains no usable image directly inside it ({len(skipped)} files skipped). "
            "Put the images in the folder itself, or in one sub-folder per class."
        )
    images.sort(key=lambda image: natural_sort_key(image.relpath))
    log.info("Scanned %s: %d images without classes, %d files skipped", root, len(images), len(skipped))
    return GalleryScan(root, "flat", None, images, skipped)


# ---------------------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True)
class IndexManifest:
    """Contents of ``manifest.json``: what the vectors mean and which data files hold them."""

    format: str
    format_version: int
    backbone: str
    weights_id: str
    preprocess_id: str
    pool: str
    feature_code_version: str
    """``FeatureKey.code_version`` of the embedder that computed the newest vectors."""
    embedding_dim: int
    count: int
    root: str
    """Absolute gallery folder that the relative paths are relative to."""
    layout: str
    class_names: list[str] | None
    next_id: int
    """Id for the next new image. Ids of removed images are not given out again until a rebuild."""
    version: str
    embeddings_file: str
    images_file: str
    created_at: str
    """Time of the first build, ISO 8601 in UTC."""
    updated_at: str
    """Time of the latest build or update that changed the index, ISO 8601 in UTC."""
    precision: str = "fp32"
    """``FeatureKey.precision`` of the vectors. Manifests written before this field existed contain fp32 vectors."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "IndexManifest":
        """Validate the fields of a parsed ``manifest.json``.

        Raises:
            ValueError: not a gallery index manifest, a newer format version, or missing fields.
        """
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{source} is not a gallery index manifest (format is {data.get('format')!r}).")
        names = [item.name for item in fields(cls)]
        required = [item.name for item in fields(cls) if item.default is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"Gallery index manifest {source} is invalid: missing fields {', '.join(missing)}.")
        if not isinstance(data["format_version"], int) or data["format_version"] > INDEX_FORMAT_VERSION:
            raise ValueError(
                f"Gallery index {source} has format_version {data['format_version']!r}, but this version of "
                f"cbir-lightning reads up to {INDEX_FORMAT_VERSION}. Upgrade cbir-lightning or rebuild the index."
            )
        return cls(**{name: data[name] for name in names if name in data})


@dataclass(frozen=True)
class IndexedImage:
    """One row of the index."""

    id: int
    """Stable id: an image keeps it across updates as long as its relative path stays."""
    relpath: str
    sha256: str
    label: int | None


@dataclass(frozen=True)
class IndexChanges:
    """Change counts of a build or update, compared by relative path with the previous version."""

    added: int
    """Relative paths that were not in the previous version."""
    removed: int
    """Relative paths of the previous version that are gone."""
    modified: int
    """Relative paths whose content hash changed."""
    unchanged: int
    embedded: int
    """Distinct new contents passed to the embedder, which may read them from the feature cache."""
    reused: int
    """Images whose vector was copied from the previous version by content hash."""


class GalleryIndex:
    """The embeddings of a gallery folder with their metadata, stored in ``directory``.

    Create one with ``build`` or ``open``. Row ``i`` of ``embeddings`` belongs to ``images[i]``, and
    rows are in ``scan_gallery`` order.
    """

    def __init__(
        self, directory: Path, manifest: IndexManifest, embeddings: torch.Tensor, images: list[IndexedImage]
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.embeddings = embeddings
        """``(N, D)`` float32 raw embeddings (not normalised)."""
        self.images = images
        self.changes: IndexChanges | None = None
        """Changes of the last ``build`` or ``update`` that returned this object, ``None`` after ``open``."""

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({str(self.directory)!r}, count={len(self)}, backbone={self.manifest.backbone!r}, "
            f"weights_id={self.manifest.weights_id!r}, dim={self.manifest.embedding_dim})"
        )

    @property
    def root(self) -> Path:
        """Gallery folder of the last build or update."""
        return Path(self.manifest.root)

    @property
    def class_names(self) -> list[str] | None:
        """Sorted class names, or ``None`` for a flat gallery."""
        return self.manifest.class_names

    @property
    def ids(self) -> torch.Tensor:
        """``(N,)`` int64 stable image ids, in row order."""
        return torch.tensor([image.id for image in self.images], dtype=torch.int64)

    @property
    def relpaths(self) -> list[str]:
        """Paths relative to ``root``, in row order."""
        return [image.relpath for image in self.images]

    @property
    def paths(self) -> list[Path]:
        """Absolute paths under ``root``, in row order."""
        return [self.root / image.relpath for image in self.images]

    @property
    def labels(self) -> list[int | None]:
        """Class labels (indices into ``class_names``) in row order, all ``None`` for a flat gallery."""
        return [image.label for image in self.images]

    @property
    def image_class_names(self) -> list[str | None]:
        """Class name of each row, all ``None`` for a flat gallery."""
        names = self.class_names
        return [names[image.label] if names is not None and image.label is not None else None for image in self.images]

    @classmethod
    def open(cls, index_dir: Path | str, embedder: Embedder | None = None) -> "GalleryIndex":
        """Load an index without computing any embedding.

        With ``embedder``, also check that its embedding configuration matches the index (see
        ``check_embedder``), which queries embedded with it need.

        Raises:
            FileNotFoundError: ``index_dir`` has no ``manifest.json``.
            ValueError: the index is invalid or corrupt, or ``embedder`` does not match it.
        """
        directory = Path(index_dir).expanduser()
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"No gallery index in {directory}: {manifest_path} not found. "
                "Create one with GalleryIndex.build(root, embedder, index_dir)."
            )
        index = _load_index(directory)
        if embedder is not None:
            index.check_embedder(embedder)
        return index

    @classmethod
    def build(
        cls,
        root: Path | str,
        embedder: Embedder,
        index_dir: Path | str,
        *,
        rebuild: bool = False,
        layout: GalleryLayout = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        show_progress: bool = True,
        lock_timeout: float = 0.0,
    ) -> "GalleryIndex":
        """Index the images of ``root`` in ``index_dir``, updating an index that is already there.

        An existing index keeps the vectors of the contents that are still in ``root``, and only new contents
        are embedded. ``rebuild=True`` discards the existing index and embeds everything through the feature
        cache. The new version replaces the old one atomically, so an interrupted build leaves the old one
        usable. While another process writes the same index, the build waits up to ``lock_timeout``
        seconds.

        Raises:
            ValueError: the existing index was built with another backbone, weights, preprocessing,
                pooling or precision than ``embedder`` (and ``rebuild`` is False), the folder has no usable
                image, or ``index_dir`` is inside ``root`` or contains files that are not an index's.
            TimeoutError: another process is still writing the same index after ``lock_timeout`` seconds.
        """
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or lock_timeout < 0:
            raise ValueError(f"Invalid lock_timeout={lock_timeout!r}: give the seconds to wait, 0 or more.")
        directory = Path(index_dir).expanduser()
        _check_index_location(directory, Path(root).expanduser())
        directory.mkdir(parents=True, exist_ok=True)
        with _write_lock(directory, lock_timeout):
            previous = None
            if not rebuild and (directory / MANIFEST_FILE).exists():
                previous = _load_index(directory)
                previous.check_embedder(embedder)
            scan = scan_gallery(root, layout, max_pixels, show_progress)
            if previous is not None and previous.manifest.root != str(scan.root):
                log.warning(
                    "Gallery index %s was built from %s and now indexes %s instead: the images of the old folder "
                    "are dropped unless the new one has the same contents. Choose another index folder to keep both.",
                    directory,
                    previous.manifest.root,
                    scan.root,
                )
            index = _write_new_version(directory, previous, scan, embedder)
            _delete_unreferenced_files(directory, index.manifest)
        return index

    def update(
        self,
        embedder: Embedder,
        root: Path | str | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        show_progress: bool = True,
    ) -> "GalleryIndex":
        """Bring the index up to date with its gallery folder, in place, and return ``self``.

        ``root`` defaults to the folder of the last build, and the gallery layout stays the one of the last
        build. The update starts from the version on disk, which is newer than this object when another
        process has updated the index since it was loaded.

        Raises:
            ValueError: ``embedder`` does not match the index, or the folder has no usable image.
            TimeoutError: another process is writing the same index.
        """
        updated = GalleryIndex.build(
            self.root if root is None else root,
            embedder,
            self.directory,
            layout=self.manifest.layout,  # type: ignore[arg-type]
            max_pixels=max_pixels,
            show_progress=show_progress,
        )
        self.manifest = updated.manifest
        self.embeddings = updated.embeddings
        self.images = updated.images
        self.changes = updated.changes
        return self

    def check_embedder(self, embedder: Embedder) -> None:
        """Raise ``ValueError`` unless ``embedder`` computes vectors comparable with the index's vectors.

        Backbone, weights id, preprocessing id, pooling and precision must all match. A different
        ``FeatureKey.code_version`` (feature format or timm version) only logs a warning.
        """
        expected = {name: getattr(self.manifest, name) for name in _KEY_FIELDS}
        actual = {name: getattr(embedder.key, name) for name in _KEY_FIELDS}
        differences = [
            f"{name}={expected[name]!r} in the index but {actual[name]!r} in the embedder"
            for name in _KEY_FIELDS
            if expected[name] != actual[name]
        ]
        if differences:
            raise ValueError(
                f"Gallery index {self.directory} was built with another embedding configuration: "
                f"{'; '.join(differences)}. Vectors of different configurations cannot be compared. "
                "Build into another folder (index.dir=<folder> on the command line, index_dir in GalleryIndex.build) "
                f"to keep this index, or replace it. {REBUILD_HINT}"
            )
        if embedder.key.code_version != self.manifest.feature_code_version:
            log.warning(
                "Gallery index %s has features of code version %s, but the embedder computes %s. "
                "If the features differ between the two: %s",
                self.directory,
                self.manifest.feature_code_version,
                embedder.key.code_version,
                REBUILD_HINT,
            )

    def create_search_backend(self, name: str = "auto", metric: Metric = "cosine", **options: Any) -> SearchBackend:
        """Build a search backend over ``embeddings``. The arguments mean what they mean in ``build_backend``."""
        return build_backend(self.embeddings, name, metric, **options)


# ---------------------------------------------------------------------------------------------------------
# Reading


def _load_index(directory: Path) -> GalleryIndex:
    """Load the version that ``manifest.json`` names, reading the manifest again if a writer replaced it."""
    for attempt in range(1, _OPEN_ATTEMPTS + 1):
        manifest = _read_manifest(directory / MANIFEST_FILE)
        try:
            return _load_version(directory, manifest)
        except FileNotFoundError as error:
            # A writer deletes the previous data files right after it replaces the manifest.
            if attempt < _OPEN_ATTEMPTS and _read_manifest(directory / MANIFEST_FILE) != manifest:
                continue
            raise ValueError(
                f"Gallery index {directory} is corrupt: {error.filename} is missing but {MANIFEST_FILE} names "
                f"it. {REBUILD_HINT}"
            ) from error
    raise AssertionError("unreachable: the last attempt returns or raises")


def _read_manifest(path: Path) -> IndexManifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Gallery index manifest {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"Gallery index manifest {path} is invalid: expected a JSON object.")
    return IndexManifest.from_dict(data, path)


def _load_version(directory: Path, manifest: IndexManifest) -> GalleryIndex:
    embeddings_path = directory / manifest.embeddings_file
    images_path = directory / manifest.images_file
    try:
        embeddings = load_file(str(embeddings_path)).get("embeddings")
        columns = json.loads(images_path.read_text(encoding="utf-8"))
    except (SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Gallery index {directory} is corrupt: cannot read its data files ({error}). {REBUILD_HINT}"
        ) from error
    if not isinstance(columns, dict):
        columns = {}

    expected_shape = (manifest.count, manifest.embedding_dim)
    if embeddings is None or embeddings.dtype != torch.float32 or tuple(embeddings.shape) != expected_shape:
        found = "no 'embeddings' tensor" if embeddings is None else f"{embeddings.dtype} {tuple(embeddings.shape)}"
        raise ValueError(
            f"Gallery index {directory} is corrupt: {embeddings_path.name} contains {found}, expected "
            f"float32 {expected_shape}. {REBUILD_HINT}"
        )
    column_names = ("ids", "relpaths", "sha256", "labels")
    lengths = {name: len(columns.get(name, ())) for name in column_names}
    if any(length != manifest.count for length in lengths.values()):
        raise ValueError(
            f"Gallery index {directory} is corrupt: {images_path.name} has column lengths {lengths}, expected "
            f"{manifest.count} each. {REBUILD_HINT}"
        )
    images = [
        IndexedImage(id=image_id, relpath=relpath, sha256=digest, label=label)
        for image_id, relpath, digest, label in zip(*(columns[name] for name in column_names), strict=True)
    ]
    return GalleryIndex(directory, manifest, embeddings, images)


# ---------------------------------------------------------------------------------------------------------
# Writing


@contextmanager
def _write_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<directory>/.lock``, waiting up to ``timeout`` seconds for it.

    The kernel releases the lock if its holder dies.
    """
    import fcntl  # POSIX only, so it is imported here and opening an index works everywhere.

    with (directory / LOCK_FILE).open("a") as handle:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"Another process is writing the gallery index in {directory} (it has locked "
                        f"{directory / LOCK_FILE}). Wait for it to finish, then try again."
                    ) from None
                if not waiting:
                    log.info("Waiting up to %.0f s for another process that writes the index in %s", timeout, directory)
                    waiting = True
                time.sleep(_LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_new_version(
    directory: Path, previous: GalleryIndex | None, scan: GalleryScan, embedder: Embedder
) -> GalleryIndex:
    embeddings, images, changes, next_id = _merge_with_previous(previous, scan, embedder)
    if previous is not None and _same_content(previous, scan, images):
        log.info("Gallery index %s is up to date with %s (%d images)", directory, scan.root, len(images))
        previous.changes = changes
        return previous

    now = datetime.now(UTC).isoformat(timespec="seconds")
    version = secrets.token_hex(6)
    manifest = IndexManifest(
        format=INDEX_FORMAT,
        format_version=INDEX_FORMAT_VERSION,
        backbone=embedder.key.backbone,
        weights_id=embedder.key.weights_id,
        preprocess_id=embedder.key.preprocess_id,
        pool=embedder.key.pool,
        precision=embedder.key.precision,
        feature_code_version=embedder.key.code_version,
        embedding_dim=int(embeddings.shape[1]),
        count=len(images),
        root=str(scan.root),
        layout=scan.layout,
        class_names=scan.class_names,
        next_id=next_id,
        version=version,
        embeddings_file=f"{_EMBEDDINGS_PREFIX}{version}.safetensors",
        images_file=f"{_IMAGES_PREFIX}{version}.json",
        created_at=previous.manifest.created_at if previous is not None else now,
        updated_at=now,
    )
    # The data files get new names, and nothing reads them until the manifest names them.
    save_file({"embeddings": embeddings.contiguous()}, str(directory / manifest.embeddings_file))
    _make_readable(directory / manifest.embeddings_file)
    _fsync_file(directory / manifest.embeddings_file)
    columns = {
        "ids": [image.id for image in images],
        "relpaths": [image.relpath for image in images],
        "sha256": [image.sha256 for image in images],
        "labels": [image.label for image in images],
    }
    _write_text_synced(directory / manifest.images_file, json.dumps(columns))
    _fsync_directory(directory)

    # The commit: one atomic rename switches readers from the previous version to this one.
    temporary = _write_temporary_text(directory, json.dumps(asdict(manifest), indent=2) + "\n")
    _make_readable(temporary)
    os.replace(temporary, directory / MANIFEST_FILE)
    _fsync_directory(directory)
    log.info(
        "Gallery index %s: %d images (%d added, %d removed, %d modified, %d embedded through the feature cache, "
        "%d vectors reused)",
        directory,
        len(images),
        changes.added,
        changes.removed,
        changes.modified,
        changes.embedded,
        changes.reused,
    )
    index = GalleryIndex(directory, manifest, embeddings, images)
    index.changes = changes
    return index


def _merge_with_previous(
    previous: GalleryIndex | None, scan: GalleryScan, embedder: Embedder
) -> tuple[torch.Tensor, list[IndexedImage], IndexChanges, int]:
    """Assemble the rows of the new version, embedding only the contents that ``previous`` lacks."""
    previous_rows = {} if previous is None else _first_row_by_content(previous)
    previous_by_path = {} if previous is None else {image.relpath: image for image in previous.images}

    new_contents: dict[str, GalleryImage] = {}
    for image in scan.images:
        if image.sha256 not in previous_rows and image.sha256 not in new_contents:
            new_contents[image.sha256] = image
    computed = embedder.embed_records(list(new_contents.values())) if new_contents else None

    # Rows of the new version, as row numbers into previous.embeddings followed by the computed vectors.
    sources = [] if previous is None else [previous.embeddings]
    offset = 0 if previous is None else len(previous.embeddings)
    if computed is not None:
        sources.append(computed.float())
    computed_rows = {digest: offset + row for row, digest in enumerate(new_contents)}
    source_rows = []
    images = []
    next_id = 0 if previous is None else previous.manifest.next_id
    for image in scan.images:
        source_rows.append(previous_rows.get(image.sha256, computed_rows.get(image.sha256)))
        old = previous_by_path.get(image.relpath)
        if old is not None:
            image_id = old.id
        else:
            image_id = next_id
            next_id += 1
        images.append(IndexedImage(id=image_id, relpath=image.relpath, sha256=image.sha256, label=image.label))
    embeddings = torch.cat(sources).index_select(0, torch.tensor(source_rows, dtype=torch.int64))

    scanned_paths = {image.relpath: image.sha256 for image in scan.images}
    kept_paths = [relpath for relpath in scanned_paths if relpath in previous_by_path]
    modified = sum(1 for relpath in kept_paths if previous_by_path[relpath].sha256 != scanned_paths[relpath])
    changes = IndexChanges(
        added=len(scanned_paths) - len(kept_paths),
        removed=sum(1 for relpath in previous_by_path if relpath not in scanned_paths),
        modified=modified,
        unchanged=len(kept_paths) - modified,
        embedded=len(new_contents),
        reused=sum(1 for image in scan.images if image.sha256 in previous_rows),
    )
    return embeddings, images, changes, next_id


def _first_row_by_content(index: GalleryIndex) -> dict[str, int]:
    rows: dict[str, int] = {}
    for row, image in enumerate(index.images):
        rows.setdefault(image.sha256, row)
    return rows


def _same_content(previous: GalleryIndex, scan: GalleryScan, images: list[IndexedImage]) -> bool:
    return (
        previous.images == images
        and previous.manifest.root == str(scan.root)
        and previous.manifest.layout == scan.layout
        and previous.manifest.class_names == scan.class_names
    )


def _check_index_location(directory: Path, root: Path) -> None:
    """Raise ``ValueError`` unless ``directory`` can hold an index of the gallery ``root``.

    A folder inside ``root`` would be scanned as part of the gallery, so it is allowed only under a name
    that starts with ``"."``. A folder without ``manifest.json`` may contain only files that a build
    writes. Together these keep a build from deleting or indexing the user's files.
    """
    resolved, gallery = directory.resolve(), root.resolve()
    if resolved == gallery or resolved.is_relative_to(gallery):
        inside = resolved.relative_to(gallery).parts
        if not inside or not any(part.startswith(".") for part in inside):
            raise ValueError(
                f"Invalid index folder {directory}: it is inside the gallery folder {root}, which would index it "
                "as images. Choose a folder outside the gallery, or one whose name starts with '.'."
            )
    if not directory.is_dir() or _is_index_manifest(directory / MANIFEST_FILE):
        return
    names = [path.name for path in directory.iterdir() if path.name != LOCK_FILE]
    foreign = sorted(name for name in names if not _INDEX_FILE_PATTERN.fullmatch(name))
    if foreign:
        raise ValueError(
            f"Invalid index folder {directory}: it contains no gallery index but {len(foreign)} other entries "
            f"(such as {foreign[0]!r}). Choose an empty or new folder for the index."
        )


def _is_index_manifest(path: Path) -> bool:
    """Return whether ``path`` is a JSON file with this project's index format name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == INDEX_FORMAT


def _delete_unreferenced_files(directory: Path, manifest: IndexManifest) -> None:
    """Delete data files of other versions and temporary files, such as those of an interrupted build."""
    keep = {manifest.embeddings_file, manifest.images_file}
    for path in directory.iterdir():
        if _INDEX_FILE_PATTERN.fullmatch(path.name) and path.name not in keep:
            log.debug("Deleting %s, which the manifest of %s does not name", path, directory)
            path.unlink(missing_ok=True)


def _write_temporary_text(directory: Path, text: str) -> Path:
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=_MANIFEST_TEMPORARY_PREFIX, suffix=_TEMPORARY_SUFFIX)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return Path(temporary)


def _make_readable(path: Path) -> None:
    """Give ``path`` the permissions of a newly created file, which safetensors and mkstemp restrict to 0600."""
    os.chmod(path, 0o666 & ~_process_umask())


def _process_umask() -> int:
    """Return the umask, from ``/proc`` where it exists, since ``os.umask`` can only read it by changing it."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return int(re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE).group(1), 8)  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def _write_text_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make completed renames and new names in ``directory`` survive a power loss, not only a crash."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
