"""Zero-shot text-to-image search of a gallery index.

Usage::

    python -m cbir_lightning.search text="a photo of a horse"
    python -m cbir_lightning.search text=horse plus=beach minus=snow
    python -m cbir_lightning.search image=query.jpg text="at night" backend=openclip

``backend=concepts`` (the default) runs offline: it describes each image by the ImageNet classes of
``backbone`` and compares texts with a sentence encoder (see ``cbir_lightning.text_search.concepts``).
``backend=openclip`` compares CLIP image and text embeddings and needs CLIP weights (see
``cbir_lightning.text_search.clip``).

The run folder receives ``search.json`` (the query parts, then each result's rank, path, class and
score), ``search.png`` (the query and the results as a grid) and ``search.html`` (the same as one
self-contained page).
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS
from cbir_lightning.retrieval.index import GalleryIndex
from cbir_lightning.retrieve import (
    GALLERY_SPLITS,
    embedder_from_config,
    gallery_rows,
    index_options,
    load_gallery_index,
)
from cbir_lightning.text_search.query import (
    QueryPart,
    TextSearchSpace,
    build_query_parts,
    embed_query,
    format_query,
    rank_scores,
)
from cbir_lightning.utils.cli import exit_on_user_error
from cbir_lightning.utils.paths import default_cache_dir
from cbir_lightning.visualize.gallery import GalleryItem, write_gallery_html, write_gallery_png

log = logging.getLogger(__name__)

BACKENDS = ("concepts", "openclip")
# UnusableImageError, raised for a query image that cannot be decoded, is a ValueError.


def search(cfg: DictConfig) -> dict[str, Any]:
    """Run one query against the gallery and write the outputs; return the contents of ``search.json``."""
    if cfg.index.split not in GALLERY_SPLITS:
        raise ValueError(f"Invalid index.split={cfg.index.split!r}. Choose one of: {', '.join(GALLERY_SPLITS)}.")
    parts = build_query_parts(cfg.text, cfg.image, _plain(cfg.plus), _plain(cfg.minus), _plain(cfg.query_weights) or {})
    templates = list(_plain(cfg.templates) or [])
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.features.cache_dir or default_cache_dir())

    space = build_search_space(cfg, cache_dir)
    index = load_gallery_index(cfg.index.root, space.embedder, cache_dir, cfg.index.dir, **index_options(cfg.index))
    rows = gallery_rows(index, cfg.index.split, tuple(cfg.index.fractions), cfg.index.split_seed)
    query = embed_query(space, parts, templates)
    scores = space.score(query, space.gallery_matrix(index.embeddings[rows]))
    excluded = _query_image_rows(index, rows, parts) if cfg.exclude_query else set()
    top_scores, top_offsets = rank_scores(scores, int(cfg.k), excluded)

    report = _report(cfg, space, index, rows, parts, templates, top_scores, top_offsets)
    (run_dir / "search.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_pictures(run_dir, report)
    log.info("Query %s: %d results written to %s", report["query"]["description"], len(report["results"]), run_dir)
    return report


def _plain(value: Any) -> Any:
    """Turn OmegaConf lists and dictionaries into Python ones, leaving other values as they are."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_search_space(cfg: DictConfig, cache_dir: Path) -> TextSearchSpace:
    """Build the search space of ``cfg.backend`` from the command's configuration.

    Raises:
        ValueError: unknown backend, or an invalid backend option.
        WeightsUnavailableError: the backend's weights cannot be obtained.
    """
    if cfg.backend == "concepts":
        # Imported here, like the CLIP backend, so that each command run imports only its own backend.
        from cbir_lightning.text_search.concepts import load_concept_search_space, load_imagenet_classifier

        classifier = load_imagenet_classifier(
            cfg.backbone.name,
            cfg.weights.source,
            cfg.weights.path,
            cfg.weights.init_seed,
            cache_dir,
            cfg.features.device,
        )
        embedder = embedder_from_config(cfg, cache_dir, cfg.index.max_pixels, cfg.index.show_progress)
        return load_concept_search_space(
            embedder,
            classifier,
            cache_dir,
            text_encoder=cfg.concepts.text_encoder,
            class_text=cfg.concepts.class_text,
            top_k=cfg.concepts.top_k,
            standardize=cfg.concepts.standardize,
            device=cfg.features.device,
        )
    if cfg.backend == "openclip":
        from cbir_lightning.text_search.clip import load_clip_search_space

        return load_clip_search_space(
            cfg.clip.model,
            cfg.clip.pretrained,
            cache_dir,
            model_config=cfg.clip.model_config,
            device=cfg.features.device,
            batch_size=cfg.features.batch_size,
            num_workers=cfg.features.num_workers,
            max_pixels=cfg.index.max_pixels,
            show_progress=cfg.index.show_progress,
        )
    raise ValueError(f"Invalid backend={cfg.backend!r}. Choose one of: {', '.join(BACKENDS)}.")


def open_gallery_index(
    space: TextSearchSpace,
    root: str | Path | None,
    cache_dir: Path,
    index_dir: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> GalleryIndex:
    """Build or update the gallery index of ``root`` with the search space's embedder.

    The arguments mean what they mean in ``cbir_lightning.retrieve.load_gallery_index``. With
    ``index_dir=None``, ``backend=concepts`` shares the index of ``cbir_lightning.retrieve`` for the same
    backbone, weights and preprocessing, which stores the same pooled CNN features.
    """
    return load_gallery_index(
        root, space.embedder, cache_dir, index_dir, max_pixels=max_pixels, show_progress=show_progress
    )


def _query_image_rows(index: GalleryIndex, rows: list[int], parts: list[QueryPart]) -> set[int]:
    """Return the positions in ``rows`` of gallery images with the content of a query image."""
    digests = {hashlib.sha256(Path(part.value).read_bytes()).hexdigest() for part in parts if part.is_image}
    return {offset for offset, row in enumerate(rows) if index.images[row].sha256 in digests}


def _report(
    cfg: DictConfig,
    space: TextSearchSpace,
    index: GalleryIndex,
    rows: list[int],
    parts: list[QueryPart],
    templates: list[str],
    scores: torch.Tensor,
    offsets: torch.Tensor,
) -> dict[str, Any]:
    result_rows = [rows[offset] for offset in offsets.tolist()]
    details = space.result_details(index.embeddings[result_rows]) if result_rows else []
    results = []
    for rank, (row, score, extra) in enumerate(zip(result_rows, scores.tolist(), details, strict=True), 1):
        results.append(
            {
                "rank": rank,
                "path": str(index.paths[row]),
                "class": index.image_class_names[row],
                "score": round(float(score), 6),
                **extra,
            }
        )
    return {
        "query": {
            "description": format_query(parts),
            "parts": [part.to_dict() for part in parts],
            "templates": templates,
        },
        "backend": space.describe(),
        "score": space.score_name,
        "k": int(cfg.k),
        "gallery": {"root": str(index.root), "split": cfg.index.split, "size": len(rows)},
        "results": results,
    }


def _write_pictures(run_dir: Path, report: dict[str, Any]) -> None:
    description = report["query"]["description"]
    images = [Path(part["value"]) for part in report["query"]["parts"] if part["role"] == "image"]
    query = GalleryItem(images[0] if images else None, 0, description)
    results = [
        GalleryItem(
            Path(item["path"]),
            item["rank"],
            item["class"] or Path(item["path"]).name,
            f"score {item['score']:.3f}",
            item["class"],
        )
        for item in report["results"]
    ]
    write_gallery_png(query, results, run_dir / "search.png")
    backend = report["backend"]
    settings = ", ".join(f"{name} {value}" for name, value in backend.items() if name != "backend")
    details = [
        f"backend {backend['backend']}: {settings}",
        f"score: {report['score']}",
        f"gallery: {report['gallery']['root']} ({report['gallery']['split']}, {report['gallery']['size']} images)",
    ]
    if report["query"]["templates"] != ["{}"]:
        details.append(f"prompt templates: {' | '.join(report['query']['templates'])}")
    title = f"Top {len(results)} results for {description}"
    write_gallery_html(query, results, run_dir / "search.html", title, details)


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> None:
    """Run :func:`search` from the command line."""
    exit_on_user_error(lambda: search(cfg))


if __name__ == "__main__":
    main()
