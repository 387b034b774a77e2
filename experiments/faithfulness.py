"""Measure whether Grad-CAM maps are faithful: deletion and insertion AUCs against random and Gaussian maps.

Usage::

    python -m experiments.faithfulness --backbone mobilenet --head-checkpoint logs/train/runs/<mobilenet run> \\
        --out explain_metrics.json

On a class-balanced sample of the COREL-1K test split (``--per-class`` images per class):

- ``class``: the map of the head's predicted class, scored by the softmax confidence of that class.
- ``similarity``: each test image queries the training split. The map of its nearest training image
  explains the cosine similarity of the pair and is scored by that similarity.

Each map is compared with a seeded random map and a centred Gaussian blob of the same size. Deletion AUC:
lower is more faithful. Insertion AUC: higher is more faithful.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from cbir_lightning.data.datamodule import resolve_data_root
from cbir_lightning.data.decode import load_rgb_image
from cbir_lightning.data.folder import scan_image_folder
from cbir_lightning.data.split import split_records
from cbir_lightning.explain.cam import ClassScoreModel, EmbeddingModel, Explainer
from cbir_lightning.explain.faithfulness import (
    class_confidence_fn,
    faithfulness_scores,
    gaussian_maps,
    random_maps,
    similarity_score_fn,
)
from cbir_lightning.explain.targets import class_targets, load_class_head, similarity_targets
from cbir_lightning.retrieval.embed import build_embedder

log = logging.getLogger(__name__)


def sample_test_records(records: list, per_class: int) -> list:
    """Take the first ``per_class`` test images of each class, in split order."""
    chosen, counts = [], {}
    for record in records:
        if counts.get(record.label, 0) < per_class:
            chosen.append(record)
            counts[record.label] = counts.get(record.label, 0) + 1
    return chosen


def score_maps(score_fn, images: torch.Tensor, maps: np.ndarray, steps: int) -> dict[str, float]:
    """Return the mean deletion and insertion AUCs of ``maps`` and of both baselines."""
    count, height, width = maps.shape
    candidates = {
        "grad-cam": maps,
        "random": random_maps(count, height, width, seed=0),
        "gaussian": gaussian_maps(count, height, width),
    }
    table = {}
    for name, candidate in candidates.items():
        scores = faithfulness_scores(score_fn, images, candidate, steps=steps)
        table[name] = {
            "deletion_auc": float(np.mean(scores["deletion_auc"])),
            "insertion_auc": float(np.mean(scores["insertion_auc"])),
        }
        log.info("%s: deletion %.4f, insertion %.4f", name, table[name]["deletion_auc"], table[name]["insertion_auc"])
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deletion and insertion AUCs of Grad-CAM maps on COREL-1K.")
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--head-checkpoint", required=True, help="a train run folder or its head.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--per-class", type=int, default=5, help="test images per class")
    parser.add_argument("--steps", type=int, default=10, help="fractions of pixels removed or inserted")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--out", type=Path, default=Path("explain_metrics.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    embedder = build_embedder(args.backbone, show_progress=False)
    backbone, preprocessing = embedder.backbone, embedder.preprocessing
    folder = scan_image_folder(resolve_data_root(args.data_root), show_progress=False)
    splits = split_records(folder.records)
    test = sample_test_records(splits["test"], args.per_class)
    images = torch.stack([preprocessing.transform(load_rgb_image(record.path)) for record in test])
    results = {"backbone": args.backbone, "weights_id": embedder.key.weights_id, "images": len(test)}

    class_head = load_class_head(args.head_checkpoint, backbone)
    with Explainer.for_classes(backbone, class_head.head, method=args.method) as explainer:
        class_maps = explainer.explain(images, class_targets([None] * len(images)))
        predicted = explainer.last_outputs.argmax(dim=1)
    log.info("class target (%d images)", len(images))
    results["class"] = score_maps(
        class_confidence_fn(ClassScoreModel(backbone, class_head.head), predicted), images, class_maps, args.steps
    )

    gallery = embedder.embed_records(splits["train"])
    queries = embedder.embed_records(test)
    nearest = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    neighbours = [splits["train"][int(index)] for index in nearest.argmax(dim=1)]
    result_images = torch.stack([preprocessing.transform(load_rgb_image(record.path)) for record in neighbours])
    with Explainer.for_similarity(backbone, method=args.method) as explainer:
        similarity_maps = explainer.explain(result_images, similarity_targets(queries))
    log.info("similarity target (%d query-result pairs)", len(images))
    results["similarity"] = score_maps(
        similarity_score_fn(EmbeddingModel(backbone), queries), result_images, similarity_maps, args.steps
    )

    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
