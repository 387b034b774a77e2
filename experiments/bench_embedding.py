"""Benchmark embedding throughput on COREL-1K: JPEG decoding, preprocessing and the backbone, per inference variant.

Usage::

    python -m experiments.bench_embedding [--backbone mobilenet] [--batch-size 32] [--num-workers 2]
        [--limit N] [--repeats 3] [--sweep-workers 0,1,2] [--out results.json]

For each variant (plain NCHW fp32, channels_last fp32, channels_last with bfloat16 autocast) the script
measures two throughputs in images per second, as the median over ``--repeats`` runs after warm-up passes:

- pipeline: the real extraction path ``cbir_lightning.features.inference.iterate_features`` over the
  images, which decodes with Pillow in DataLoader workers and preprocesses, without the feature cache;
- forward: the backbone alone on a random batch of the same shape.

It prints their ratio and the pipeline speed-up of each variant over NCHW fp32. It also compares the
features of each variant with NCHW fp32: the largest absolute difference, and the fraction of queries
whose top-12 cosine neighbours are the same list in the same order (or the same set). The last columns
are the leave-one-out cosine mAP and its change. Nothing is downloaded, because the weights come from
the installed weight packages (``--weights-source auto``).
"""

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir_lightning.data.datamodule import resolve_data_root
from cbir_lightning.data.folder import ImageRecord, scan_image_folder
from cbir_lightning.data.transforms import Preprocessing, build_preprocessing
from cbir_lightning.evaluation.retrieval_metrics import leave_one_out_metrics
from cbir_lightning.features.inference import autocast_context, iterate_features, prepare_for_inference, to_model_input
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.retrieval.search import ExactBackend
from experiments.benchmarking import format_table, machine_info, median, print_machine_info, write_json

log = logging.getLogger(__name__)

TOP_K = 12
SPEED_UP_TARGET = 1.4  # pipeline throughput of the best fp32 variant over NCHW fp32
RATIO_TARGET = 0.9  # pipeline throughput over forward-only throughput


@dataclass(frozen=True)
class Variant:
    """One way of running the backbone: memory format and forward-pass precision."""

    name: str
    channels_last: bool
    precision: str


BASELINE = Variant("nchw-fp32", channels_last=False, precision="fp32")
VARIANTS = (BASELINE, Variant("channels_last-fp32", True, "fp32"), Variant("channels_last-bf16", True, "bf16"))


def select_records(records: list[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """Return ``limit`` records spread evenly over the list, so that every class keeps some, or all of them."""
    if limit is None or limit >= len(records):
        return records
    positions = np.linspace(0, len(records) - 1, num=limit).round().astype(int)
    return [records[position] for position in positions]


def time_forward(
    backbone: FrozenBackbone,
    input_size: tuple[int, int, int],
    variant: Variant,
    batch_size: int,
    batches: int,
    warmup: int,
    repeats: int,
) -> list[float]:
    """Return the forward-only throughput in images/s of each repeat, ``batches`` random batches per repeat.

    The timed step is the one that ``iterate_features`` runs per batch: conversion of the input to the
    variant's memory format, the forward pass under the variant's autocast, and conversion to float32.
    """
    device = next(backbone.parameters()).device
    prepare_for_inference(backbone, variant.channels_last)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, *input_size, generator=generator)

    def step() -> None:
        with torch.inference_mode(), autocast_context(variant.precision, device):
            backbone(to_model_input(images, device, variant.channels_last)).float().cpu()

    for _ in range(warmup):
        step()
    throughputs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            step()
        throughputs.append(batches * batch_size / (time.perf_counter() - start))
    return throughputs


def time_pipeline(
    paths: list[Path],
    backbone: FrozenBackbone,
    preprocessing: Preprocessing,
    variant: Variant,
    batch_size: int,
    num_workers: int,
    repeats: int,
) -> tuple[list[float], torch.Tensor]:
    """Return the pipeline throughput in images/s of each repeat and the features of the last repeat.

    Each repeat starts a new DataLoader, so the worker start-up is part of the measured time, as it is in
    every call of ``FeatureCache.extract``.
    """
    throughputs, features = [], torch.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        batches = iterate_features(
            paths,
            backbone,
            preprocessing,
            batch_size,
            num_workers,
            channels_last=variant.channels_last,
            precision=variant.precision,
        )
        features = torch.cat(list(batches))
        throughputs.append(len(paths) / (time.perf_counter() - start))
    return throughputs, features


def top_k_neighbours(features: torch.Tensor, k: int) -> torch.Tensor:
    """Return the ``(N, k)`` indices of each image's k nearest other images by cosine similarity, best first."""
    backend = ExactBackend("cosine")
    backend.add(features)
    return backend.search(features, k, exclude=[[row] for row in range(len(features))]).indices


def compare_with_baseline(features: torch.Tensor, baseline: torch.Tensor, k: int) -> dict[str, float]:
    """Return the largest absolute feature difference and the fractions of queries with the same top-k."""
    neighbours, baseline_neighbours = top_k_neighbours(features, k), top_k_neighbours(baseline, k)
    same_order = (neighbours == baseline_neighbours).all(dim=1)
    same_set = (neighbours.sort(dim=1).values == baseline_neighbours.sort(dim=1).values).all(dim=1)
    return {
        "max_abs_diff": float((features - baseline).abs().max()),
        "max_abs_value": float(baseline.abs().max()),
        "top_k_identical_order": float(same_order.float().mean()),
        "top_k_identical_set": float(same_set.float().mean()),
    }


def run_variant(
    variant: Variant,
    backbone: FrozenBackbone,
    preprocessing: Preprocessing,
    paths: list[Path],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Time one variant, forward-only and pipeline, and return its results and pipeline features."""
    forward_batches = args.forward_batches or max(1, len(paths) // args.batch_size)
    print(f"[{variant.name}] forward pass: {forward_batches} batches x {args.repeats} repeats", file=sys.stderr)
    forward = time_forward(
        backbone,
        preprocessing.input_size,
        variant,
        args.batch_size,
        forward_batches,
        args.warmup,
        args.repeats,
    )
    print(f"[{variant.name}] pipeline: {len(paths)} images x {args.repeats} repeats", file=sys.stderr)
    pipeline, features = time_pipeline(
        paths, backbone, preprocessing, variant, args.batch_size, args.num_workers, args.repeats
    )
    result = {
        "variant": variant.name,
        "channels_last": variant.channels_last,
        "precision": variant.precision,
        "forward_images_per_s": forward,
        "pipeline_images_per_s": pipeline,
        "forward_median": median(forward),
        "pipeline_median": median(pipeline),
    }
    result["pipeline_over_forward"] = result["pipeline_median"] / result["forward_median"]
    print(
        f"[{variant.name}] forward {result['forward_median']:.1f} images/s, "
        f"pipeline {result['pipeline_median']:.1f} images/s",
        file=sys.stderr,
    )
    return result, features


def sweep_workers(
    worker_counts: list[int],
    backbone: FrozenBackbone,
    preprocessing: Preprocessing,
    paths: list[Path],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Time the channels_last fp32 pipeline with each number of DataLoader workers."""
    variant = VARIANTS[1]
    rows = []
    for num_workers in worker_counts:
        print(f"[workers={num_workers}] pipeline: {len(paths)} images x {args.repeats} repeats", file=sys.stderr)
        throughputs, _ = time_pipeline(
            paths, backbone, preprocessing, variant, args.batch_size, num_workers, args.repeats
        )
        rows.append({"num_workers": num_workers, "pipeline_images_per_s": throughputs, "median": median(throughputs)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet", help="registered backbone name (default: mobilenet)")
    parser.add_argument(
        "--weights-source", default="auto", help="weights.source of the backbone (default: auto, offline packages)"
    )
    parser.add_argument("--data-root", default=None, help="image folder (default: the COREL-1K folder found)")

    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader decoding processes (default: 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the main process (default: torch's)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only this many images, spread over the classes")

    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward batches before timing (default: 2)")
    parser.add_argument(
        "--forward-batches",
        type=int,
        default=None,
        help="random batches per forward-only repeat (default: as many full batches as the images fill)",
    )
    parser.add_argument(
        "--sweep-workers",
        default="",
        help="comma-separated worker counts to time the channels_last fp32 pipeline with, such as 0,1,2",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")

    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.num_workers < 0:
        parser.error("--batch-size and --repeats must be at least 1, --warmup and --num-workers at least 0")
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2 for leave-one-out rankings, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine_info(info)

    scan = scan_image_folder(resolve_data_root(args.data_root), show_progress=False)
    records = select_records(scan.records, args.limit)
    paths = [record.path for record in records]
    labels = torch.tensor([record.label for record in records])
    backbone = build_backbone(args.backbone, args.weights_source, pool="avg")
    preprocessing = build_preprocessing(backbone.model, "model")
    print(
        f"{args.backbone} ({backbone.weights_id}), input {'x'.join(map(str, preprocessing.input_size))}, "
        f"{len(paths)} images from {scan.root}, batch size {args.batch_size}, {args.num_workers} workers"
    )

    results, features = [], {}
    for variant in VARIANTS:
        result, features[variant.name] = run_variant(variant, backbone, preprocessing, paths, args)
        results.append(result)

    k = min(TOP_K, len(paths) - 1)
    baseline = features[BASELINE.name]
    baseline_map = float(leave_one_out_metrics(baseline, labels, scan.class_names)["mAP"])
    for result in results:
        result.update(compare_with_baseline(features[result["variant"]], baseline, k))
        mean_ap = float(leave_one_out_metrics(features[result["variant"]], labels, scan.class_names)["mAP"])
        result["mAP"] = mean_ap
        result["mAP_change"] = mean_ap - baseline_map
        result["speed_up"] = result["pipeline_median"] / results[0]["pipeline_median"]

    print()
    print(
        format_table(
            [
                "variant",
                "forward img/s",
                "pipeline img/s",
                "pipeline/forward",
                "speed-up",
                "max |diff|",
                f"same top-{k} (order)",
                f"same top-{k} (set)",
                "mAP",
                "mAP change",
            ],
            [
                [
                    result["variant"],
                    round(result["forward_median"], 1),
                    round(result["pipeline_median"], 1),
                    result["pipeline_over_forward"],
                    result["speed_up"],
                    result["max_abs_diff"],
                    result["top_k_identical_order"],
                    result["top_k_identical_set"],
                    result["mAP"],
                    result["mAP_change"],
                ]
                for result in results
            ],
        )
    )
    summary = summarize(results)
    print()
    for line in summary["lines"]:
        print(line)

    worker_rows = []
    if args.sweep_workers:
        worker_counts = [int(count) for count in args.sweep_workers.split(",")]
        worker_rows = sweep_workers(worker_counts, backbone, preprocessing, paths, args)
        print()
        print("channels_last-fp32 pipeline by DataLoader workers:")
        print(
            format_table(
                ["num_workers", "pipeline img/s"], [[row["num_workers"], row["median"]] for row in worker_rows]
            )
        )

    output = {
        "machine": info,
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "backbone": args.backbone,
        "weights_id": backbone.weights_id,
        "images": len(paths),
        "top_k": k,
        "variants": results,
        "summary": summary,
        "worker_sweep": worker_rows,
    }
    if args.out:
        write_json(args.out, output)
        print(f"\nWrote {args.out}")
    return output


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the best fp32 variant and the bf16 variant with the targets and return the summary lines."""
    fp32 = [result for result in results if result["precision"] == "fp32"]
    best = max(fp32, key=lambda result: result["pipeline_median"])
    lines = [
        f"Best fp32 variant: {best['variant']}, pipeline speed-up {best['speed_up']:.2f}x over {BASELINE.name} "
        f"(target >= {SPEED_UP_TARGET}x: {'met' if best['speed_up'] >= SPEED_UP_TARGET else 'missed'})",
        f"Pipeline/forward of {best['variant']}: {best['pipeline_over_forward']:.3f} "
        f"(target >= {RATIO_TARGET}: {'met' if best['pipeline_over_forward'] >= RATIO_TARGET else 'missed'})",
    ]
    bf16 = [result for result in results if result["precision"] == "bf16"]
    for result in bf16:
        lines.append(
            f"{result['variant']}: pipeline speed-up {result['speed_up']:.2f}x, leave-one-out mAP "
            f"{result['mAP']:.4f} ({result['mAP_change']:+.4f} against {BASELINE.name})"
        )
    return {"best_fp32_variant": best["variant"], "best_fp32_speed_up": best["speed_up"], "lines": lines}


if __name__ == "__main__":
    main()
