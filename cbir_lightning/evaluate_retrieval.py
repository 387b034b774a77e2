"""Measure leave-one-out retrieval quality on a labelled image folder for several embedding options.

Usage::

    python -m cbir_lightning.evaluate_retrieval backbone=efficientnet_lite2
    python -m cbir_lightning.evaluate_retrieval head_checkpoint=logs/train/runs/<run> \\
        'options=[raw_euclidean,cosine,head_penultimate]'

Writes ``retrieval_metrics.json`` and ``retrieval_metrics.md`` (mAP over the full ranking, precision@k,
recall@k and mAP per class) into the run folder.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from cbir_lightning.data.datamodule import resolve_data_root
from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS
from cbir_lightning.data.folder import scan_image_folder
from cbir_lightning.evaluation.retrieval_metrics import ranking_metrics, similarity_matrix
from cbir_lightning.explain.targets import load_class_head
from cbir_lightning.models.heads import MLPHead
from cbir_lightning.retrieval.embed import Embedder
from cbir_lightning.retrieval.transforms import expanded_query_scores, head_penultimate, pca_whiten
from cbir_lightning.retrieve import embedder_from_config
from cbir_lightning.utils.cli import exit_on_user_error
from cbir_lightning.utils.paths import default_cache_dir

log = logging.getLogger(__name__)

OPTIONS = ("raw_euclidean", "cosine", "pca_whiten", "query_expansion", "head_penultimate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Compute the metrics of every requested embedding option and write them; return the JSON contents."""
    unknown = [option for option in cfg.options if option not in OPTIONS]
    if unknown:
        raise ValueError(f"Invalid options {unknown}. Choose from: {', '.join(OPTIONS)}.")
    if not cfg.cutoffs or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cfg.cutoffs):
        raise ValueError(
            f"Invalid cutoffs={list(cfg.cutoffs)}: give one or more integers of at least 1, e.g. [10, 12]."
        )
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.features.cache_dir or default_cache_dir())
    embedder = embedder_from_config(cfg, cache_dir, DEFAULT_MAX_PIXELS, cfg.show_progress)
    head = _load_head(cfg, embedder) if "head_penultimate" in cfg.options else None
    folder = scan_image_folder(resolve_data_root(cfg.data_root), show_progress=cfg.show_progress)
    features = embedder.embed_records(folder.records)
    labels = torch.tensor([record.label for record in folder.records])

    results: dict[str, Any] = {
        "backbone": cfg.backbone.name,
        "weights_id": embedder.key.weights_id,
        "random_weights": embedder.key.weights_id.startswith("none:"),
        "preprocess_id": embedder.key.preprocess_id,
        "precision": embedder.key.precision,
        "data_root": str(folder.root),
        "num_images": len(folder.records),
        "settings": {
            "cutoffs": list(cfg.cutoffs),
            "pca_dims": int(cfg.pca_dims),
            "query_expansion_top_n": int(cfg.query_expansion_top_n),
        },
        "options": {},
    }
    for option in cfg.options:
        scores = _option_scores(option, features, cfg, head)
        results["options"][option] = ranking_metrics(scores, labels, folder.class_names, tuple(cfg.cutoffs))
        log.info("%s: mAP %.4f", option, results["options"][option]["mAP"])

    (run_dir / "retrieval_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "retrieval_metrics.md").write_text(markdown_report(results, tuple(cfg.cutoffs)))
    log.info("Wrote %s", run_dir / "retrieval_metrics.md")
    return results


def _option_scores(option: str, features: torch.Tensor, cfg: DictConfig, head: MLPHead | None) -> torch.Tensor:
    builders: dict[str, Callable[[], torch.Tensor]] = {
        "raw_euclidean": lambda: similarity_matrix(features, "euclidean"),
        "cosine": lambda: similarity_matrix(features, "cosine"),
        "pca_whiten": lambda: similarity_matrix(pca_whiten(features, cfg.pca_dims), "cosine"),
        "query_expansion": lambda: expanded_query_scores(features, cfg.query_expansion_top_n),
        "head_penultimate": lambda: similarity_matrix(head_penultimate(features, head), "cosine"),
    }
    return builders[option]()


def _load_head(cfg: DictConfig, embedder: Embedder) -> MLPHead:
    if not cfg.head_checkpoint:
        raise ValueError(
            "The head_penultimate option needs a trained head: set head_checkpoint=<train run folder or head.pt>."
        )
    return load_class_head(cfg.head_checkpoint, embedder.backbone, cfg.preprocess).head


def markdown_report(results: dict[str, Any], cutoffs: tuple[int, ...]) -> str:
    """Render the overall and per-class tables."""
    weights = results["weights_id"] + (" (RANDOM weights, mechanism only)" if results["random_weights"] else "")
    lines = [
        f"Leave-one-out retrieval on {results['data_root']} ({results['num_images']} images), "
        f"backbone {results['backbone']}, weights {weights}, {results['precision']} features.",
        "",
        "| embedding | mAP | "
        + " | ".join(f"P@{k}" for k in cutoffs)
        + " | "
        + " | ".join(f"R@{k}" for k in cutoffs)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(cutoffs)),
    ]
    for option, metrics in results["options"].items():
        cells = [f"{metrics['mAP']:.4f}"] + [f"{metrics[f'P@{k}']:.4f}" for k in cutoffs]
        cells += [f"{metrics[f'R@{k}']:.4f}" for k in cutoffs]
        lines.append(f"| {option} | " + " | ".join(cells) + " |")
    options = list(results["options"])
    classes = list(next(iter(results["options"].values()))["per_class_mAP"]) if options else []
    lines += ["", "mAP per class:", "", "| class | " + " | ".join(options) + " |", "|---|" + "---:|" * len(options)]
    for name in classes:
        cells = [f"{results['options'][option]['per_class_mAP'][name]:.4f}" for option in options]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate_retrieval")
def main(cfg: DictConfig) -> None:
    """Run :func:`evaluate` from the command line."""
    exit_on_user_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
