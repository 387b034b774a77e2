"""Rebuild the backbone comparison table from training runs, next to the published numbers.

Usage::

    python -m experiments.compare logs/train/multiruns/<time> [more sweep or run folders] [--out DIR]

Every ``metrics.json`` under the given folders is one job. Jobs are grouped by backbone, weights,
preprocessing and pooling, and each group reports the mean and sample standard deviation over its
seeds. The script writes ``comparison.md`` and ``comparison.png`` (accuracy bars with error bars)
into ``--out``, which defaults to the first folder. ``--results FILE`` also replaces the part of FILE
between the ``<!-- comparison:start -->`` and ``<!-- comparison:end -->`` lines with the new table, and
copies the chart next to FILE as ``comparison.png``.
"""

import argparse
import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

# Test accuracy and macro precision, recall and F1 published for the six frozen ImageNet backbones on
# COREL-1K (2025): Keras weights, a 99-image test set and a single run each.
PUBLISHED = {
    "xception": (0.9899, 0.9908, 0.9899, 0.9899),
    "mobilenet": (0.9495, 0.9584, 0.9495, 0.9495),
    "densenet121": (0.9495, 0.9589, 0.9495, 0.9483),
    "nasnetmobile": (0.9495, 0.9571, 0.9495, 0.9490),
    "mobilenetv2": (0.9394, 0.9412, 0.9394, 0.9388),
    "vgg16": (0.8990, 0.9058, 0.8990, 0.8985),
}
SCORES = ("test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro")
SECTION_START = "<!-- comparison:start -->"
SECTION_END = "<!-- comparison:end -->"


@dataclass
class Group:
    """The jobs of one backbone, weights, preprocessing and pooling combination."""

    backbone: str
    weights: str
    preprocess: str
    pool: str
    jobs: list[dict] = field(default_factory=list)

    @property
    def trained(self) -> list[dict]:
        return [job for job in self.jobs if job.get("status", "trained") == "trained"]

    @property
    def random_weights(self) -> bool:
        return any(job.get("random_weights") for job in self.trained)

    def mean_std(self, key: str) -> tuple[float, float] | None:
        values = [job[key] for job in self.trained]
        if not values:
            return None
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), spread


def load_jobs(folders: list[Path]) -> list[dict]:
    """Read every ``metrics.json`` under ``folders``."""
    jobs = []
    for folder in folders:
        for path in sorted(folder.rglob("metrics.json")):
            job = json.loads(path.read_text())
            job["path"] = str(path.parent)
            jobs.append(job)
    if not jobs:
        raise SystemExit(f"No metrics.json found under {', '.join(map(str, folders))}: pass sweep or run folders.")
    return jobs


def group_jobs(jobs: list[dict]) -> list[Group]:
    """Group jobs by backbone, weights, preprocessing and pooling, in backbone order of the published table."""
    groups: dict[tuple[str, str, str, str], Group] = {}
    for job in jobs:
        weights = job.get("weights_id") or f"{job.get('weights_source')} (requested)"
        key = (job["backbone"], weights, job.get("preprocess", "?"), job.get("pool", "?"))
        groups.setdefault(key, Group(*key)).jobs.append(job)
    order = {name: index for index, name in enumerate(PUBLISHED)}
    return sorted(
        groups.values(),
        key=lambda group: (order.get(group.backbone, len(order)), group.backbone, group.weights, group.preprocess),
    )


def format_score(value: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    mean, spread = value
    return f"{mean:.4f} ± {spread:.4f}"


def weights_label(group: Group) -> str:
    if not group.trained:
        reasons = {job.get("status", "failed") for job in group.jobs}
        return ", ".join(sorted(reasons))
    if group.random_weights:
        return f"RANDOM weights ({group.weights}), mechanism only"
    return group.weights


def markdown_table(groups: list[Group]) -> str:
    """Render the comparison as a Markdown table with the published scores in adjacent columns."""
    header = (
        "| backbone | weights | preprocess | pool | seeds | accuracy | published | precision | published "
        "| recall | published | F1 | published |"
    )
    lines = [header, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group in groups:
        published = PUBLISHED.get(group.backbone)
        cells = [group.backbone, weights_label(group), group.preprocess, group.pool, str(len(group.trained))]
        for index, key in enumerate(SCORES):
            cells.append(format_score(group.mean_std(key)))
            cells.append(f"{published[index]:.4f}" if published else "-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({job["reason"] for group in groups for job in group.jobs if job.get("reason")})
    if notes:
        lines += ["", "Jobs without results:", ""] + [f"- {reason}" for reason in notes]
    return "\n".join(lines) + "\n"


def plot_accuracy(groups: list[Group], path: Path) -> None:
    """Draw mean test accuracy per group with standard-deviation error bars, beside the published accuracy."""
    shown = [group for group in groups if group.trained]
    positions = list(range(len(shown)))
    means = [group.mean_std("test_accuracy")[0] for group in shown]
    spreads = [group.mean_std("test_accuracy")[1] for group in shown]
    colours = ["#bbbbbb" if group.random_weights else "#3b75af" for group in shown]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(shown) + 2), 4.8))
    width = 0.4
    bars = axes.bar([x - width / 2 for x in positions], means, width, yerr=spreads, capsize=4, color=colours)
    bars.set_label("this project: mean ± std over seeds (grey: random weights)")
    axes.bar_label(bars, labels=[f"{mean:.3f}" for mean in means], padding=2, fontsize=7)
    published = [
        (x, PUBLISHED[group.backbone][0])
        for x, group in zip(positions, shown, strict=True)
        if group.backbone in PUBLISHED
    ]
    if published:
        xs, values = zip(*published, strict=True)
        reference = axes.bar([x + width / 2 for x in xs], values, width, color="#d62728", label="published (one run)")
        axes.bar_label(reference, labels=[f"{value:.3f}" for value in values], padding=2, fontsize=7)
    labels = [f"{group.backbone}\n{group.preprocess}/{group.pool}" for group in shown]
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylabel("test accuracy")
    lowest = min([*means, *(value for _, value in published)], default=0.0)
    axes.set_ylim(0.0 if lowest < 0.5 else max(0.0, lowest - 0.1), 1.02)
    axes.set_title("Frozen ImageNet backbones on COREL-1K: test accuracy", fontsize=10)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep or run folders that contain metrics.json files")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first folder)")
    parser.add_argument(
        "--results", type=Path, default=None, help="a Markdown file whose comparison section to replace"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    groups = group_jobs(load_jobs(args.folders))
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(markdown_table(groups))
    plot_accuracy(groups, out / "comparison.png")
    log.info("Wrote %s and %s", out / "comparison.md", out / "comparison.png")
    if args.results:
        replace_section(args.results, markdown_table(groups))
        shutil.copyfile(out / "comparison.png", args.results.parent / "comparison.png")
        log.info("Updated %s", args.results)


def replace_section(path: Path, table: str) -> None:
    """Replace the lines between the section markers of ``path`` with ``table``."""
    text = path.read_text()
    if SECTION_START not in text or SECTION_END not in text:
        raise SystemExit(f"{path} has no '{SECTION_START}' ... '{SECTION_END}' section to replace.")
    before, rest = text.split(SECTION_START, 1)
    _, after = rest.split(SECTION_END, 1)
    path.write_text(f"{before}{SECTION_START}\n{table}{SECTION_END}{after}")


if __name__ == "__main__":
    main()
