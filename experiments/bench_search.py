"""Benchmark nearest-neighbour search: index build time, single-query latency, recall@12 and peak memory.

Usage::

    python -m experiments.bench_search [--sizes 1000,100000] [--queries 200] [--skip-real]
        [--nprobe 8,16,32] [--ef-search 32,64,128] [--out results.json]

Galleries, all searched with the cosine metric:

- ``corel-1k``: the 1,000 COREL-1K embeddings of ``--backbone`` (default mobilenet, 1024-d), read through
  the feature cache. The queries are ``--queries`` gallery images spread over the folder, and each query
  excludes itself, as in a leave-one-out evaluation. ``--skip-real`` leaves this gallery out.
- ``synthetic-<N>`` for each of ``--sizes``: seeded vectors from a Gaussian mixture (see
  ``sample_mixture``), with ``--queries`` further vectors of the same mixture as queries.

Backends: ``exact`` (torch) and faiss ``flat``, ``ivf`` and ``hnsw``. IVF and HNSW are built once per
gallery and searched with each value of ``--nprobe`` and ``--ef-search``. Recall@12 is the mean fraction
of the exact backend's 12 results that a backend also returns.

Every backend runs in a fresh process (multiprocessing "spawn"), so its peak memory is that process's
peak resident set size (``VmHWM`` in ``/proc/self/status``). The peak covers the interpreter, torch,
faiss and the gallery itself. The "before" column is the same counter after the gallery and queries
exist and before the backend is built, so the difference is what the backend adds, its temporary
copies included. A 1M x 1024 float32 gallery takes 3.8 GiB (4 GB). At that size the exact backend peaked at
8.9 GiB and faiss HNSW at 11.9 GiB on the development machine, so the 1M size needs about 12 GiB free
and took 9 minutes on 2 cores.
"""

import argparse
import logging
import math
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir_lightning.retrieval.search import SearchBackend, create_backend
from experiments.benchmarking import (
    format_table,
    machine_info,
    percentile,
    print_machine_info,
    usable_cores,
    write_json,
)

log = logging.getLogger(__name__)

TOP_K = 12
EXACT_TARGET_MS = 1.0  # median latency of the exact backend over the 1k COREL gallery
APPROXIMATE_TARGET_MS = 5.0  # median latency of an approximate backend over 1M vectors
RECALL_TARGET = 0.95
WARMUP_QUERIES = 5
# Rows generated at once, so that the float32 temporaries stay near 100 MB for 1024-d vectors. The
# generated values depend on it, so changing it changes every synthetic gallery.
GENERATION_BLOCK = 25_000
# Vectors per faiss add: bounds the normalised copy that the backend makes of each added batch.
ADD_CHUNK = 100_000
# IVF trains its k-means quantizer on the first add, so the first chunk contains this many vectors per list.
IVF_TRAINING_VECTORS_PER_LIST = 64


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture in a low-dimensional latent space, projected into ``dim`` dimensions.

    Cluster ``j`` has centre ``centres[j]`` and standard deviation ``scales[j] * axis_scales[i]`` along
    latent axis ``i``. ``axis_scales`` falls as ``(i + 1) ** -0.25``, a decaying spectrum as real CNN
    features have, whose participation ratio is about 24 effective dimensions for 32 latent axes.
    ``projection`` maps the latent space into ``dim`` dimensions, where isotropic noise of standard
    deviation ``noise`` is added.

    NOTE: the spectrum and the cluster spread are choices, not fitted to real features. Recall on real
    galleries of the same size can be lower or higher.
    """

    centres: np.ndarray  # (clusters, latent_dim)
    scales: np.ndarray  # (clusters,)
    axis_scales: np.ndarray  # (latent_dim,)
    projection: np.ndarray  # (latent_dim, dim)
    noise: float


def make_mixture(dim: int, clusters: int, latent_dim: int, seed: int, noise: float = 0.02) -> Mixture:
    """Draw the parameters of a ``Mixture`` from ``seed``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent_dim), dtype=np.float32)
    scales = rng.uniform(0.5, 1.5, size=clusters).astype(np.float32)
    axis_scales = (np.arange(1, latent_dim + 1) ** -0.25).astype(np.float32)
    # Entries of variance 1/dim make the projection close to an isometry from the latent space.
    projection = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    return Mixture(centres, scales, axis_scales, projection, noise)


def sample_mixture(mixture: Mixture, count: int, seed: int) -> np.ndarray:
    """Return ``(count, dim)`` float32 vectors of ``mixture``, each from a uniformly chosen cluster."""
    rng = np.random.default_rng(seed)
    latent_dim, dim = mixture.projection.shape
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, GENERATION_BLOCK):
        rows = min(GENERATION_BLOCK, count - start)
        cluster = rng.integers(len(mixture.centres), size=rows)
        spread = rng.standard_normal((rows, latent_dim), dtype=np.float32) * mixture.axis_scales
        latent = mixture.centres[cluster] + mixture.scales[cluster, None] * spread
        noise = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(mixture.noise)
        vectors[start : start + rows] = latent @ mixture.projection + noise
    return vectors


def load_dataset(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[list[int]] | None]:
    """Return the gallery, the queries and the per-query exclusions that ``spec`` describes."""
    if spec["kind"] == "real":
        gallery = np.load(spec["path"])
        rows = spec["query_rows"]
        return gallery, gallery[rows].copy(), [[row] for row in rows]
    mixture = make_mixture(spec["dim"], spec["clusters"], spec["latent_dim"], spec["seed"])
    gallery = sample_mixture(mixture, spec["count"], spec["seed"] + 1)
    queries = sample_mixture(mixture, spec["queries"], spec["seed"] + 2)
    return gallery, queries, None


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status``.

    ``getrusage``'s ``ru_maxrss`` is no use in a spawned process, because Linux carries it over from the
    forked parent through ``execve``, while ``VmHWM`` belongs to the new process image. Where
    ``/proc`` is missing, this falls back to ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress(label: str, message: str) -> None:
    """Print a progress line to stderr, so that stdout contains only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {message}", file=sys.stderr, flush=True)


def build_backend_chunked(task: dict[str, Any], gallery: np.ndarray, label: str) -> SearchBackend:
    """Create the task's backend and add ``gallery``, in chunks for faiss with progress lines."""
    backend = create_backend(task["backend"], "cosine", **task["options"])
    if task["backend"] == "exact":
        # ExactBackend concatenates the gallery on every add, so one add is cheapest.
        backend.add(gallery)
        return backend
    first = ADD_CHUNK
    if task["options"].get("index_type") == "ivf":
        first = max(first, IVF_TRAINING_VECTORS_PER_LIST * task["options"]["nlist"])
    bounds = [0, *range(min(first, len(gallery)), len(gallery), ADD_CHUNK), len(gallery)]
    start_time = time.perf_counter()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        backend.add(gallery[start:end])
        elapsed = time.perf_counter() - start_time
        remaining = elapsed / end * (len(gallery) - end)
        if len(bounds) > 2:
            progress(label, f"added {end}/{len(gallery)} vectors, {elapsed:.0f} s, about {remaining:.0f} s left")
    return backend


def run_backend(task: dict[str, Any]) -> dict[str, Any]:
    """Build one backend over the task's gallery, time single-vector queries and measure memory.

    Runs in a fresh process. Returns the build time, the peak RSS before and after, and per search
    setting the latencies in milliseconds and the ``(Q, k)`` result indices.
    """
    import faiss

    torch.set_num_threads(task["threads"])
    faiss.omp_set_num_threads(task["threads"])
    label = task["label"]
    gallery, queries, exclusions = load_dataset(task["dataset"])
    data_rss = peak_rss_mib()
    progress(label, f"building over {len(gallery)} x {gallery.shape[1]} vectors")

    start = time.perf_counter()
    backend = build_backend_chunked(task, gallery, label)
    build_seconds = time.perf_counter() - start
    progress(label, f"built in {build_seconds:.1f} s")

    settings = []
    option, values = task["sweep"] if task["sweep"] else (None, [None])
    for value in values:
        if option is not None:
            setattr(backend, option, value)
        # Warm-up queries fill caches and let faiss and torch start their thread pools.
        for row in range(min(WARMUP_QUERIES, len(queries))):
            backend.search(queries[row : row + 1], task["k"], exclude=exclusions[row : row + 1] if exclusions else None)
        latencies, indices = [], []
        for row in range(len(queries)):
            exclude = exclusions[row : row + 1] if exclusions else None
            query_start = time.perf_counter()
            result = backend.search(queries[row : row + 1], task["k"], exclude=exclude)
            latencies.append((time.perf_counter() - query_start) * 1000)
            indices.append(result.indices[0].numpy())
        settings.append({"setting": f"{option}={value}" if option else "-", "latencies_ms": latencies})
        settings[-1]["indices"] = np.stack(indices)
        progress(label, f"{settings[-1]['setting']}: median {np.median(latencies):.3f} ms")
    return {
        "build_seconds": build_seconds,
        "data_rss_mib": data_rss,
        "peak_rss_mib": peak_rss_mib(),
        "settings": settings,
    }


def run_in_fresh_process(task: dict[str, Any]) -> dict[str, Any]:
    """Run ``run_backend(task)`` in a new spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as executor:
        return executor.submit(run_backend, task).result()


def ivf_list_count(size: int, requested: int | None) -> int:
    """Return ``requested``, or ``round(2 * sqrt(size))`` limited to one list per 39 gallery vectors.

    Faiss warns below 39 training vectors per list. For the 1M gallery this gives 2,000 lists, trained
    on 128k vectors (``IVF_TRAINING_VECTORS_PER_LIST``) in 10 k-means iterations, about 5 TFLOP.
    """
    if requested is not None:
        return requested
    return max(1, min(round(2 * math.sqrt(size)), size // 39))


def backend_tasks(size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Return the exact, flat, IVF and HNSW tasks for a gallery of ``size`` vectors, exact first."""
    nlist = ivf_list_count(size, args.nlist)
    nprobe_values = sorted({min(value, nlist) for value in args.nprobe})
    hnsw = {"index_type": "hnsw", "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
    return [
        {"backend": "exact", "name": "exact", "options": {}, "sweep": None},
        {"backend": "faiss", "name": "faiss-flat", "options": {"index_type": "flat"}, "sweep": None},
        {
            "backend": "faiss",
            "name": f"faiss-ivf (nlist={nlist})",
            "options": {"index_type": "ivf", "nlist": nlist},
            "sweep": ("nprobe", nprobe_values),
        },
        {
            "backend": "faiss",
            "name": f"faiss-hnsw (M={args.hnsw_m}, efConstruction={args.ef_construction})",
            "options": hnsw,
            "sweep": ("ef_search", args.ef_search),
        },
    ]


def benchmark_dataset(name: str, size: int, dataset: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every backend over one gallery and return one row per backend and search setting."""
    rows, exact_indices = [], None
    for task in backend_tasks(size, args):
        label = f"{name} {task['name']}"
        task.update({"label": label, "dataset": dataset, "k": TOP_K, "threads": args.threads})
        result = run_in_fresh_process(task)
        for setting in result["settings"]:
            if exact_indices is None:
                exact_indices = setting["indices"]
            latencies = setting["latencies_ms"]
            rows.append(
                {
                    "dataset": name,
                    "size": size,
                    "backend": task["name"],
                    "setting": setting["setting"],
                    "build_seconds": result["build_seconds"],
                    "median_ms": percentile(latencies, 50),
                    "p99_ms": percentile(latencies, 99),
                    "recall_at_12": recall_at_k(setting["indices"], exact_indices),
                    "data_rss_mib": result["data_rss_mib"],
                    "peak_rss_mib": result["peak_rss_mib"],
                }
            )
    return rows


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Return the mean over queries of the fraction of the exact results that ``found`` contains."""
    hits = [
        len(set(found_row.tolist()) & set(exact_row.tolist())) / len(exact_row)
        for found_row, exact_row in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits))


def real_dataset(args: argparse.Namespace, folder: Path) -> tuple[int, dict[str, Any]]:
    """Embed COREL-1K through the feature cache, save the embeddings under ``folder`` and describe them."""
    # Imported here, so that the spawned benchmark processes, which import this module, do not load timm.
    from cbir_lightning.data.datamodule import resolve_data_root
    from cbir_lightning.data.folder import scan_image_folder
    from cbir_lightning.retrieval.embed import build_embedder

    embedder = build_embedder(args.backbone, cache_dir=args.cache_dir, num_workers=2, show_progress=False)
    scan = scan_image_folder(resolve_data_root(args.data_root), show_progress=False)
    records = scan.records
    if args.limit is not None and args.limit < len(records):
        records = [records[row] for row in np.linspace(0, len(records) - 1, num=args.limit).round().astype(int)]
    start = time.perf_counter()
    embeddings = embedder.embed_records(records).numpy()
    print(
        f"corel: {len(embeddings)} x {embeddings.shape[1]} {args.backbone} embeddings from {scan.root} "
        f"({embedder.cache.stats.cached} cached, {embedder.cache.stats.computed} computed, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    path = folder / "corel_embeddings.npy"
    np.save(path, embeddings)
    query_rows = np.linspace(0, len(embeddings) - 1, num=min(args.queries, len(embeddings))).round().astype(int)
    return len(embeddings), {"kind": "real", "path": str(path), "query_rows": query_rows.tolist()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def integers(text: str) -> list[int]:
        return [int(value) for value in text.split(",") if value]

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=integers,
        default=integers("1000,100000"),
        help="comma-separated synthetic gallery sizes (default: 1000,100000; 1000000 needs about 12 GiB "
        "of memory and 9 minutes on 2 cores)",
    )
    parser.add_argument("--dim", type=int, default=1024, help="dimension of the synthetic vectors (default: 1024)")
    parser.add_argument("--queries", type=int, default=200, help="single-vector queries per setting (default: 200)")
    parser.add_argument("--skip-real", action="store_true", help="leave out the COREL-1K gallery")
    parser.add_argument("--backbone", default="mobilenet", help="backbone of the COREL-1K embeddings")
    parser.add_argument("--data-root", default=None, help="image folder (default: the COREL-1K folder found)")
    parser.add_argument(
        "--cache-dir", default=None, help="feature cache folder (default: $CBIR_CACHE_DIR or ~/.cache/cbir_lightning)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only this many COREL-1K images, for quick runs")

    parser.add_argument("--clusters", type=int, default=1000, help="mixture clusters of the synthetic vectors")
    parser.add_argument("--latent-dim", type=int, default=32, help="latent dimension of the synthetic mixture")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic vectors")

    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 2*sqrt(N), see ivf_list_count)")
    parser.add_argument("--nprobe", type=integers, default=integers("8,16,32"), help="IVF nprobe values to sweep")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default: 32)")
    parser.add_argument("--ef-construction", type=int, default=40, help="HNSW efConstruction (default: 40)")
    parser.add_argument(
        "--ef-search", type=integers, default=integers("32,64,128"), help="HNSW efSearch values to sweep"
    )
    parser.add_argument(
        "--threads", type=int, default=usable_cores(), help="torch and faiss (OpenMP) threads (default: usable cores)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")

    args = parser.parse_args(argv)
    if args.queries < 1 or args.threads < 1 or any(size <= TOP_K for size in args.sizes):
        parser.error(f"--queries and --threads must be at least 1, and every size above {TOP_K}")
    if args.limit is not None and args.limit <= TOP_K:
        parser.error(f"--limit must be above {TOP_K}, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine_info(info)
    print(f"torch and faiss threads in each benchmark process: {args.threads}")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_search_") as folder:
        if not args.skip_real:
            size, dataset = real_dataset(args, Path(folder))
            rows += benchmark_dataset("corel-1k" if size == 1000 else f"corel-{size}", size, dataset, args)
        for size in args.sizes:
            dataset = {
                "kind": "synthetic",
                "count": size,
                "dim": args.dim,
                "queries": args.queries,
                "clusters": args.clusters,
                "latent_dim": args.latent_dim,
                "seed": args.seed,
            }
            rows += benchmark_dataset(f"synthetic-{size}", size, dataset, args)

    print()
    print(
        format_table(
            ["gallery", "backend", "setting", "build s", "median ms", "p99 ms", "recall@12", "before MiB", "peak MiB"],
            [
                [
                    row["dataset"],
                    row["backend"],
                    row["setting"],
                    round(row["build_seconds"], 2),
                    row["median_ms"],
                    row["p99_ms"],
                    round(row["recall_at_12"], 4),
                    round(row["data_rss_mib"]),
                    round(row["peak_rss_mib"]),
                ]
                for row in rows
            ],
        )
    )
    print(
        "Latencies are over single-vector queries (p99 is the 99th percentile). Memory is the benchmark process's "
        "peak resident set: 'before' once Python, torch, faiss and the vectors are loaded, 'peak' at the end. "
        f"The targets are the project's: exact search over COREL-1K under {EXACT_TARGET_MS} ms, approximate search "
        f"over the largest gallery under {APPROXIMATE_TARGET_MS} ms at recall@12 >= {RECALL_TARGET}."
    )
    lines = summarize(rows)
    print()
    for line in lines:
        print(line)
    output = {"machine": info, "arguments": {**vars(args), "out": str(args.out)}, "rows": rows, "summary": lines}
    if args.out:
        write_json(args.out, output)
        print(f"\nWrote {args.out}")
    return output


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Compare the exact backend on COREL-1K and the approximate backends on the largest gallery with the targets."""
    lines = []
    for row in rows:
        if row["dataset"].startswith("corel") and row["backend"] == "exact":
            verdict = "met" if row["median_ms"] < EXACT_TARGET_MS else "missed"
            lines.append(
                f"exact over {row['dataset']}: median {row['median_ms']:.3f} ms "
                f"(target < {EXACT_TARGET_MS} ms: {verdict})"
            )
    largest = max((row["size"] for row in rows if row["dataset"].startswith("synthetic")), default=None)
    if largest is None:
        return lines
    approximate = [
        row
        for row in rows
        if row["size"] == largest
        and row["dataset"].startswith("synthetic")
        and ("ivf" in row["backend"] or "hnsw" in row["backend"])
    ]
    good = [row for row in approximate if row["recall_at_12"] >= RECALL_TARGET]
    if good:
        best = min(good, key=lambda row: row["median_ms"])
        verdict = "met" if best["median_ms"] < APPROXIMATE_TARGET_MS else "missed"
        lines.append(
            f"fastest approximate search over {largest} vectors with recall@12 >= {RECALL_TARGET}: {best['backend']} "
            f"{best['setting']}, median {best['median_ms']:.3f} ms, recall@12 {best['recall_at_12']:.4f} "
            f"(target < {APPROXIMATE_TARGET_MS} ms, set for 1M vectors: {verdict})"
        )
    else:
        lines.append(
            f"no approximate setting over {largest} vectors reached recall@12 >= {RECALL_TARGET} (target missed)"
        )
    return lines


if __name__ == "__main__":
    main()
