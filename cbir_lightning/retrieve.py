"""Query-by-image retrieval from a persistent gallery index.

Usage::

    python -m cbir_lightning.retrieve                         # a random training image of COREL-1K
    python -m cbir_lightning.retrieve query=photo.jpg k=20 metric=euclidean

The run folder receives ``retrieval.json`` (the query, then each result's rank, path, class and score),
``retrieval.png`` (the query and the results as a grid) and ``retrieval.html`` (the same as one
self-contained page). With ``explain=similarity|class|both`` the pictures show each image beside its
Grad-CAM heat maps, and ``maps/*.npy`` contains the raw maps.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cbir_lightning.data.datamodule import resolve_data_root
from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, UnusableImageError
from cbir_lightning.data.folder import ImageRecord
from cbir_lightning.data.split import SPLIT_NAMES, split_records
from cbir_lightning.explain.retrieval import EXPLAIN_MODES, explain_retrieval
from cbir_lightning.retrieval.embed import Embedder, build_embedder
from cbir_lightning.retrieval.index import MANIFEST_FILE, GalleryIndex
from cbir_lightning.retrieval.search import BACKEND_NAMES, METRICS, SearchResult, build_backend
from cbir_lightning.utils.cli import exit_on_user_error
from cbir_lightning.utils.paths import default_cache_dir
from cbir_lightning.visualize.explained import write_explained_html, write_explained_png
from cbir_lightning.visualize.gallery import GalleryItem, write_gallery_html, write_gallery_png

log = logging.getLogger(__name__)

GALLERY_SPLITS = (*SPLIT_NAMES, "all")


@dataclass(frozen=True)
class Query:
    """The query image and its embedding; ``gallery_rows`` are the gallery rows with the same content."""

    path: Path
    class_name: str | None
    vector: torch.Tensor
    gallery_rows: tuple[int, ...]


def retrieve(cfg: DictConfig) -> dict[str, Any]:
    """Run one query against the gallery and write the outputs; return the contents of ``retrieval.json``."""
    if cfg.index.split not in GALLERY_SPLITS:
        raise ValueError(f"Invalid index.split={cfg.index.split!r}. Choose one of: {', '.join(GALLERY_SPLITS)}.")
    if cfg.explain not in EXPLAIN_MODES:
        raise ValueError(f"Invalid explain={cfg.explain!r}. Choose one of: {', '.join(EXPLAIN_MODES)}.")
    _check_search_options(cfg)
    if cfg.explain in ("class", "both") and not cfg.head_checkpoint:
        raise FileNotFoundError(
            f"explain={cfg.explain} needs a trained head: train one with python -m cbir_lightning.train "
            f"backbone={cfg.backbone.name}, then pass head_checkpoint=<its run folder>."
        )
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.features.cache_dir or default_cache_dir())
    embedder = embedder_from_config(cfg, cache_dir, cfg.index.max_pixels, cfg.index.show_progress)
    index = load_gallery_index(cfg.index.root, embedder, cache_dir, cfg.index.dir, **index_options(cfg.index))
    rows = gallery_rows(index, cfg.index.split, tuple(cfg.index.fractions), cfg.index.split_seed)
    query = _resolve_query(cfg, index, rows, embedder)
    search = _search(cfg, index, rows, query)

    report = _report(cfg, index, rows, query, search)
    (run_dir / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.explain == "none":
        _write_pictures(run_dir, cfg, report)
    else:
        _write_explained(run_dir, cfg, report, embedder)
    log.info("Query %s: %d results written to %s", query.path, len(report["results"]), run_dir)
    return report


def _check_search_options(cfg: DictConfig) -> None:
    """Reject invalid search settings before the backbone loads and the gallery is indexed."""
    if cfg.metric not in METRICS:
        raise ValueError(f"Invalid metric={cfg.metric!r}. Choose one of: {', '.join(METRICS)}.")
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend={cfg.backend!r}. Choose one of: {', '.join(BACKEND_NAMES)}.")
    if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or cfg.k < 1:
        raise ValueError(f"Invalid k={cfg.k!r}: it must be an integer of at least 1.")


def embedder_from_config(cfg: DictConfig, cache_dir: Path, max_pixels: int | None, show_progress: bool) -> Embedder:
    """Build the embedder of a command config's ``backbone``, ``weights``, ``preprocess`` and ``features``."""
    return build_embedder(
        cfg.backbone.name,
        cfg.weights.source,
        cfg.weights.path,
        cfg.preprocess,
        cache_dir,
        init_seed=cfg.weights.init_seed,
        device=cfg.features.device,
        batch_size=cfg.features.batch_size,
        num_workers=cfg.features.num_workers,
        max_pixels=max_pixels,
        show_progress=show_progress,
        channels_last=cfg.features.channels_last,
        precision=cfg.features.precision,
    )


def load_gallery_index(
    root: str | Path | None,
    embedder: Embedder,
    cache_dir: Path,
    index_dir: str | Path | None = None,
    *,
    scan: bool = True,
    rebuild: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
    lock_timeout: float = 0.0,
) -> GalleryIndex:
    """Open, update or rebuild the gallery index of ``root``: the ``index`` options of the commands.

    ``root=None`` resolves the default data folder, as ``index.root=null`` does, and ``index_dir=None``
    picks a folder under ``cache_dir`` from the root and the embedder's key. ``rebuild`` replaces the
    index. ``scan=False`` opens an existing index as it is, without scanning ``root``, which saves
    hashing every file of a large gallery. An index that does not exist yet is built either way.
    ``lock_timeout`` is how long to wait while another process writes the same index.
    """
    root = resolve_data_root(root).resolve()
    directory = Path(index_dir).expanduser() if index_dir else _default_index_dir(cache_dir, root, embedder)
    if not scan and not rebuild and (directory / MANIFEST_FILE).exists():
        log.info("index.scan=false: using the gallery index in %s without scanning %s", directory, root)
        index = GalleryIndex.open(directory, embedder)
        if index.manifest.root != str(root):
            log.warning(
                "index.scan=false: the index in %s was built from %s, not from %s. Set index.scan=true to index %s.",
                directory,
                index.manifest.root,
                root,
                root,
            )
        return index
    return GalleryIndex.build(
        root,
        embedder,
        directory,
        rebuild=rebuild,
        max_pixels=max_pixels,
        show_progress=show_progress,
        lock_timeout=lock_timeout,
    )


def index_options(index_cfg: DictConfig) -> dict[str, Any]:
    """Return the ``load_gallery_index`` keyword arguments of a command config's ``index`` section."""
    return {
        "scan": index_cfg.scan,
        "rebuild": index_cfg.rebuild,
        "max_pixels": index_cfg.max_pixels,
        "show_progress": index_cfg.show_progress,
        "lock_timeout": index_cfg.lock_timeout,
    }


def _default_index_dir(cache_dir: Path, root: Path, embedder: Embedder) -> Path:
    digest = hashlib.sha256(f"{root}|{embedder.key.digest()}".encode()).hexdigest()[:12]
    return cache_dir / "indexes" / f"{embedder.key.backbone}-{digest}"


def gallery_rows(index: GalleryIndex, split: str, fractions: tuple[float, ...], split_seed: int) -> list[int]:
    """Return the index rows that form the gallery: all of them, or one part of the per-class split."""
    if split == "all":
        return list(range(len(index.images)))
    if index.class_names is None:
        raise ValueError(
            f"index.split={split} needs class sub-folders, but {index.root} is a flat folder. Use index.split=all."
        )
    records = [
        ImageRecord(
            index.root / image.relpath, image.relpath, index.class_names[image.label], image.label, image.sha256
        )
        for image in index.images
    ]
    chosen = {record.relpath for record in split_records(records, fractions, split_seed)[split]}
    rows = [row for row, image in enumerate(index.images) if image.relpath in chosen]
    if not rows:
        raise ValueError(
            f"index.split={split} selects no image of {index.root}: its classes are too small for "
            f"index.fractions={list(fractions)}. Use index.split=all, or give the {split} part a larger fraction."
        )
    return rows


def _resolve_query(cfg: DictConfig, index: GalleryIndex, rows: list[int], embedder: Embedder) -> Query:
    class_names = index.image_class_names
    if str(cfg.query) == "random":
        generator = torch.Generator().manual_seed(int(cfg.seed))
        row = rows[int(torch.randint(len(rows), (1,), generator=generator))]
        return Query(index.paths[row], class_names[row], index.embeddings[row], _rows_with_content(index, row))
    path = Path(str(cfg.query)).expanduser()
    if path.is_dir():
        raise ValueError(f"Query {str(path)!r} is a folder. Pass query=<image file> or query=random.")
    if not path.is_file():
        raise FileNotFoundError(f"Query image {str(path)!r} not found. Pass query=<image file> or query=random.")
    try:
        vector = embedder.embed_image(path)
    except UnusableImageError as error:
        raise ValueError(f"Query {str(path)!r} is not a usable image ({error.reason}).") from error
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    same = tuple(row for row, image in enumerate(index.images) if image.sha256 == digest)
    class_name = class_names[same[0]] if same else None
    return Query(path.resolve(), class_name, vector, same)


def _rows_with_content(index: GalleryIndex, row: int) -> tuple[int, ...]:
    digest = index.images[row].sha256
    return tuple(other for other, image in enumerate(index.images) if image.sha256 == digest)


@dataclass(frozen=True)
class Search:
    """The results of the query, with the backend that found them and the gallery positions left out."""

    result: SearchResult
    backend: str
    excluded: int


def _search(cfg: DictConfig, index: GalleryIndex, rows: list[int], query: Query) -> Search:
    # One query: backend=auto stays exact, because building an approximate index would take longer.
    backend = build_backend(index.embeddings[rows], cfg.backend, cfg.metric, expected_queries=1, **backend_options(cfg))
    position = {row: offset for offset, row in enumerate(rows)}
    excluded = {position[row] for row in query.gallery_rows if row in position} if cfg.exclude_query else set()
    if excluded:
        log.info("Leaving out %d gallery image(s) with the query's content (exclude_query=true)", len(excluded))
    if cfg.k > len(rows) - len(excluded):
        log.warning(
            "k=%d is larger than the %d gallery images that can be returned: all of them are.",
            cfg.k,
            len(rows) - len(excluded),
        )
    result = backend.search(query.vector[None], int(cfg.k), exclude=[excluded])
    return Search(result, backend.name, len(excluded))


def backend_options(cfg: DictConfig) -> dict[str, Any]:
    """Return the ``backend_options`` that are set, leaving out the null ones that mean "the default"."""
    options = OmegaConf.to_container(cfg.backend_options, resolve=True) or {}
    return {name: value for name, value in options.items() if value is not None}


def _report(cfg: DictConfig, index: GalleryIndex, rows: list[int], query: Query, search: Search) -> dict[str, Any]:
    result = search.result
    score_name = "similarity" if result.higher_is_better else "distance"
    results = []
    for rank, (offset, score) in enumerate(zip(result.indices[0].tolist(), result.scores[0].tolist(), strict=True), 1):
        row = rows[offset]
        results.append(
            {
                "rank": rank,
                "path": str(index.paths[row]),
                "class": index.image_class_names[row],
                score_name: round(float(score), 6),
            }
        )
    same_class = [item["class"] == query.class_name for item in results] if query.class_name else []
    return {
        "query": {"path": str(query.path), "class": query.class_name},
        "backbone": cfg.backbone.name,
        "weights_id": index.manifest.weights_id,
        "metric": result.metric,
        "score": score_name,
        "k": int(cfg.k),
        "gallery": {"root": str(index.root), "split": cfg.index.split, "size": len(rows)},
        # Over the results returned, which are fewer than k when the gallery is smaller.
        "precision_at_k": sum(same_class) / len(same_class) if same_class else None,
        "settings": {
            "seed": int(cfg.seed),
            "backend": search.backend,
            "backend_options": backend_options(cfg),
            "exclude_query": bool(cfg.exclude_query),
            "excluded": search.excluded,
            "preprocess_id": index.manifest.preprocess_id,
            "precision": index.manifest.precision,
            "index_dir": str(index.directory),
        },
        "results": results,
    }


def _write_pictures(run_dir: Path, cfg: DictConfig, report: dict[str, Any]) -> None:
    query_class = report["query"]["class"]
    query = GalleryItem(
        Path(report["query"]["path"]), 0, query_class or Path(report["query"]["path"]).name, "", query_class
    )
    short = "cos" if report["score"] == "similarity" else "d"
    results = [
        GalleryItem(
            Path(item["path"]),
            item["rank"],
            item["class"] or Path(item["path"]).name,
            f"{short} {item[report['score']]:.3f}",
            item["class"],
        )
        for item in report["results"]
    ]
    write_gallery_png(query, results, run_dir / "retrieval.png")
    details = [
        f"backbone {report['backbone']} ({report['weights_id']}), metric {report['metric']}",
        f"gallery: {report['gallery']['root']} ({report['gallery']['split']}, {report['gallery']['size']} images)",
    ]
    if report["precision_at_k"] is not None:
        details.append(f"results of the query's class: {report['precision_at_k']:.0%}")
    title = f"Top {len(results)} results for {Path(report['query']['path']).name}"
    write_gallery_html(query, results, run_dir / "retrieval.html", title, details)


def _write_explained(run_dir: Path, cfg: DictConfig, report: dict[str, Any], embedder: Embedder) -> None:
    maps = explain_retrieval(
        embedder.backbone,
        embedder.preprocessing,
        Path(report["query"]["path"]),
        [Path(item["path"]) for item in report["results"]],
        cfg.explain,
        cfg.explain_method,
        cfg.head_checkpoint,
        cfg.explain_batch_size,
    )
    maps_dir = run_dir / "maps"
    maps_dir.mkdir(exist_ok=True)
    for name in ("similarity_results", "similarity_query", "class_maps"):
        value = getattr(maps, name)
        if value is not None:
            np.save(maps_dir / f"{name}.npy", value)
    title = f"Top {len(report['results'])} results for {Path(report['query']['path']).name}, explained ({cfg.explain})"
    write_explained_png(report, maps, run_dir / "retrieval.png")
    write_explained_html(report, maps, run_dir / "retrieval.html", title)


@hydra.main(version_base="1.3", config_path="../conf", config_name="retrieve")
def main(cfg: DictConfig) -> None:
    """Run :func:`retrieve` from the command line."""
    exit_on_user_error(lambda: retrieve(cfg))


if __name__ == "__main__":
    main()
