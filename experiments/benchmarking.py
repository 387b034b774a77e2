"""Helpers shared by the benchmark scripts: machine description, timing statistics, tables and JSON output."""

import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# /proc/cpuinfo flags that decide which oneDNN kernels run: AVX-512, its bfloat16 extension and AMX tiles.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on (its affinity mask, not the machine total)."""
    return len(os.sched_getaffinity(0))


def machine_info() -> dict[str, Any]:
    """Describe the CPU, the instruction-set flags and the torch thread settings of this process."""
    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu_model": model,
        "usable_cores": usable_cores(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
    }


def print_machine_info(info: dict[str, Any]) -> None:
    """Print ``machine_info()`` as a few labelled lines."""
    flags = ", ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in info["cpu_flags"].items())
    print(f"CPU: {info['cpu_model']} ({info['usable_cores']} usable cores)")
    print(f"CPU flags: {flags}")
    print(
        f"torch {info['torch']} (CPU capability {info['torch_cpu_capability']}, oneDNN "
        f"{'available' if info['mkldnn_available'] else 'missing'}), {info['torch_threads']} intra-op threads, "
        f"Python {info['python']}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile of ``values`` (0 to 100), linearly interpolated as numpy does."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render ``rows`` as a Markdown table. Floats are shown with 4 significant digits, None as "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
