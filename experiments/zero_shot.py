"""Zero-shot classification and text retrieval quality of the text search backends on a class folder.

Usage::

    CBIR_CACHE_DIR=/tmp/cache python -m experiments.zero_shot --backbones mobilenet efficientnet_lite2
    python -m experiments.zero_shot --backend openclip --clip-model ViT-B-32 --clip-pretrained laion2b_s34b_b79k

Every class folder gets a text prompt, or one per template, whose embeddings are averaged. Zero-shot
classification sends each image to the class whose prompt scores highest for it, and precision@k is the
share of the prompt's class among the ``k`` best-scoring images of each prompt. Scores come from the same
search spaces as ``python -m cbir_lightning.search``.

Two prompt sets are evaluated. ``names`` is "a photo of a {folder name}", the bare class names.
``descriptions`` inserts a short description of each class into the templates (default
"a photo of {}."). On COREL-1K each description states what its class folder contains, such as
"people and villages in Africa" for ``africa``. Any other folder uses its folder names as descriptions.
The ``concepts`` backend is also evaluated with class texts of lemmas only, and with and without score
standardisation (see ``cbir_lightning.text_search.concepts``).

The script writes ``zero_shot.json`` (every number, the prompts and the failures) and ``zero_shot.md``
(the tables) to ``--out``.
"""

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from cbir_lightning.retrieval.index import GalleryIndex
from cbir_lightning.search import open_gallery_index
from cbir_lightning.text_search.concepts import (
    CLASS_TEXT_STYLES,
    ConceptSearchSpace,
    build_concept_embedder,
    cached_text_embeddings,
    imagenet_class_texts,
    load_concept_search_space,
)
from cbir_lightning.text_search.query import TextSearchSpace, embed_text, rank_scores
from cbir_lightning.utils.paths import default_cache_dir

log = logging.getLogger(__name__)

# One description per COREL-1K class folder. "dinosaurs" are rendered models on a plain background, and
# "mountains" include snow fields and glaciers.
COREL_DESCRIPTIONS = {
    "africa": "people and villages in Africa",
    "beaches": "a beach",
    "buildings": "buildings and historical monuments",
    "buses": "a bus",
    "dinosaurs": "a dinosaur",
    "elephants": "an elephant",
    "flowers": "flowers",
    "food": "food",
    "horses": "a horse",
    "mountains": "mountains with snow and glaciers",
}
DEFAULT_TEMPLATES = ("a photo of {}.",)
NAME_TEMPLATE = "a photo of a {}"
# Free-text queries as a user types them into the search command (templates ["{}"]).
FREE_TEXT_QUERIES = ("a photo of an elephant", "a photo of a horse", "people in an African village")
FAILURE_EXAMPLES = 3  # wrongly ranked images listed per prompt


def class_prompts(class_names: Sequence[str], prompt_set: str, templates: Sequence[str]) -> dict[str, list[str]]:
    """Return the prompts of each class: one for ``names``, one per template for ``descriptions``."""
    if prompt_set == "names":
        return {name: [NAME_TEMPLATE.format(name)] for name in class_names}
    descriptions = {name: COREL_DESCRIPTIONS.get(name, name) for name in class_names}
    return {name: [template.replace("{}", descriptions[name]) for template in templates] for name in class_names}


def prompt_vectors(space: TextSearchSpace, prompts: dict[str, list[str]]) -> torch.Tensor:
    """Return one unit-length vector per class: the normalised mean of its prompts' embeddings."""
    return torch.stack([F.normalize(space.encode_texts(texts).mean(dim=0), dim=0) for texts in prompts.values()])


def evaluate_prompts(
    space: TextSearchSpace,
    index: GalleryIndex,
    prompts: dict[str, list[str]],
    k: int = 12,
    gallery: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Score every image for every class prompt and return accuracy, precision@k and the failures.

    ``prompts`` maps each class folder name of ``index`` to its prompts. ``gallery`` is
    ``space.gallery_matrix(index.embeddings)``, computed when not given.

    Raises:
        ValueError: the index has no class folders, or ``prompts`` misses one of its classes.
    """
    class_names = index.class_names
    if class_names is None:
        raise ValueError(f"Zero-shot evaluation needs class sub-folders, but {index.root} is a flat folder.")
    missing = sorted(set(class_names) - set(prompts))
    if missing:
        raise ValueError(f"No prompt for the classes {missing}.")
    if gallery is None:
        gallery = space.gallery_matrix(index.embeddings)
    labels = torch.tensor(index.labels)
    vectors = prompt_vectors(space, {name: prompts[name] for name in class_names})
    scores = torch.stack([space.score(vector, gallery) for vector in vectors], dim=1)

    predicted = scores.argmax(dim=1)
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    for true, guess in zip(labels.tolist(), predicted.tolist(), strict=True):
        confusion[true, guess] += 1
    per_class = {}
    for label, name in enumerate(class_names):
        top_scores, top_rows = rank_scores(scores[:, label], k)
        top_labels = labels[top_rows]
        wrong = [row for row in top_rows.tolist() if int(labels[row]) != label]
        per_class[name] = {
            "prompts": prompts[name],
            "precision_at_k": float((top_labels == label).float().mean()),
            "accuracy": float(confusion[label, label] / confusion[label].sum()),
            "predicted_as": _counts(confusion[label], class_names),
            "top_k_classes": dict(Counter(class_names[int(item)] for item in top_labels).most_common()),
            "wrong_in_top_k": [
                {"path": index.images[row].relpath, **_details(space, index, row)} for row in wrong[:FAILURE_EXAMPLES]
            ],
        }
    return {
        "accuracy": float((predicted == labels).float().mean()),
        "mean_precision_at_k": sum(item["precision_at_k"] for item in per_class.values()) / len(per_class),
        "k": k,
        "per_class": per_class,
    }


def _counts(row: torch.Tensor, class_names: Sequence[str]) -> dict[str, int]:
    return {class_names[index]: int(count) for index, count in enumerate(row.tolist()) if count}


def _details(space: TextSearchSpace, index: GalleryIndex, row: int) -> dict[str, Any]:
    return space.result_details(index.embeddings[row : row + 1])[0]


def free_text_checks(space: TextSearchSpace, index: GalleryIndex, gallery: torch.Tensor, k: int) -> dict[str, Any]:
    """Return the classes of the ``k`` best images for each of ``FREE_TEXT_QUERIES``, typed as they are."""
    names = index.image_class_names
    checks = {}
    for query in FREE_TEXT_QUERIES:
        _, rows = rank_scores(space.score(embed_text(space, query), gallery), k)
        checks[query] = dict(Counter(names[row] for row in rows.tolist()).most_common())
    return checks


def evaluate_concepts(
    backbone: str, root: Path | None, cache_dir: Path, templates: Sequence[str], k: int, top_k: int
) -> dict[str, Any]:
    """Evaluate the ``concepts`` backend of one backbone with every class text style and prompt set."""
    embedder, classifier = build_concept_embedder(backbone, cache_dir=cache_dir, show_progress=False)
    space = load_concept_search_space(embedder, classifier, cache_dir, top_k=top_k)
    index = open_gallery_index(space, root, cache_dir, show_progress=False)
    free_text = free_text_checks(space, index, space.gallery_matrix(index.embeddings), k)
    runs = []
    for class_text in CLASS_TEXT_STYLES:
        class_vectors = cached_text_embeddings(space.encoder, imagenet_class_texts(class_text), cache_dir)
        variant = ConceptSearchSpace(
            embedder, classifier, space.encoder, space.class_names, class_vectors, top_k, True, class_text
        )
        gallery = variant.gallery_matrix(index.embeddings)
        for prompt_set in ("names", "descriptions"):
            prompts = class_prompts(index.class_names or [], prompt_set, templates)
            for standardize in (True, False):
                variant.standardize = standardize
                result = evaluate_prompts(variant, index, prompts, k, gallery)
                runs.append({"class_text": class_text, "prompt_set": prompt_set, **variant.describe(), **result})
    return {"backbone": backbone, "gallery": str(index.root), "runs": runs, "free_text": free_text}


def evaluate_openclip(
    model: str,
    pretrained: str,
    model_config: Path | None,
    root: Path | None,
    cache_dir: Path,
    templates: Sequence[str],
    k: int,
) -> dict[str, Any]:
    """Evaluate the ``openclip`` backend with both prompt sets."""
    from cbir_lightning.text_search.clip import load_clip_search_space

    space = load_clip_search_space(model, pretrained, cache_dir, model_config=model_config, show_progress=False)
    index = open_gallery_index(space, root, cache_dir, show_progress=False)
    gallery = space.gallery_matrix(index.embeddings)
    runs = []
    for prompt_set in ("names", "descriptions"):
        prompts = class_prompts(index.class_names or [], prompt_set, templates)
        runs.append(
            {"prompt_set": prompt_set, **space.describe(), **evaluate_prompts(space, index, prompts, k, gallery)}
        )
    return {
        "backbone": f"openclip:{model}",
        "gallery": str(index.root),
        "runs": runs,
        "free_text": free_text_checks(space, index, gallery, k),
    }


def markdown_report(results: list[dict[str, Any]], command: str) -> str:
    """Return the tables of ``zero_shot.md``: one row per run, then per-class details of the first run."""
    lines = [f"# Zero-shot search on {results[0]['gallery']}", "", f"Command: `{command}`", ""]
    for result in results:
        first = result["runs"][0]
        k = first["k"]
        lines += [f"## {result['backbone']}", "", f"| run | accuracy | mean P@{k} |", "|---|---:|---:|"]
        for run in result["runs"]:
            lines.append(f"| {_run_name(run)} | {run['accuracy']:.3f} | {run['mean_precision_at_k']:.3f} |")
        main = _main_run(result["runs"])
        lines += [
            "",
            f"Per class, {_run_name(main)}:",
            "",
            f"| class | prompt | accuracy | P@{k} | predicted as | top {k} |",
            "|---|---|---:|---:|---|---|",
        ]
        for name, item in main["per_class"].items():
            lines.append(
                f"| {name} | {' / '.join(item['prompts'])} | {item['accuracy']:.2f} | {item['precision_at_k']:.2f} "
                f"| {_format_counts(item['predicted_as'])} | {_format_counts(item['top_k_classes'])} |"
            )
        lines += ["", f"Free-text queries, classes of the top {k}:", ""]
        lines += [f"- {query!r}: {_format_counts(counts)}" for query, counts in result["free_text"].items()]
        lines.append("")
    return "\n".join(lines)


def _run_name(run: dict[str, Any]) -> str:
    parts = [f"prompts={run['prompt_set']}"]
    if run.get("backend") == "concepts":
        parts += [f"class_text={run['class_text']}", f"standardize={run['standardize']}"]
    return ", ".join(parts)


def _main_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the search command's defaults: descriptions, definitions, standardised."""
    for run in runs:
        defaults = run.get("class_text", "definition") == "definition" and run.get("standardize", True)
        if run["prompt_set"] == "descriptions" and defaults:
            return run
    return runs[0]


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="class folder (default: COREL-1K, as index.root)")
    parser.add_argument("--backend", choices=("concepts", "openclip"), default="concepts")
    parser.add_argument("--backbones", nargs="+", default=["mobilenet", "efficientnet_lite2"], help="concepts only")
    parser.add_argument("--top-k", type=int, default=10, help="concepts only: ImageNet classes per image")
    parser.add_argument("--clip-model", default="ViT-B-32", help="openclip only: the open_clip model name")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", help="openclip only: a tag or a file")
    parser.add_argument("--clip-model-config", type=Path, default=None, help="openclip only: a model config JSON")
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), help="templates with one {}")
    parser.add_argument("--k", type=int, default=12, help="cutoff of precision@k")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $CBIR_CACHE_DIR or ~/.cache")
    parser.add_argument("--out", type=Path, default=None, help="default: logs/zero_shot/<time>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cache_dir = args.cache_dir or default_cache_dir()
    out = args.out or Path("logs/zero_shot") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.backend == "concepts":
        results = [
            evaluate_concepts(backbone, args.root, cache_dir, args.templates, args.k, args.top_k)
            for backbone in args.backbones
        ]
    else:
        results = [
            evaluate_openclip(
                args.clip_model,
                args.clip_pretrained,
                args.clip_model_config,
                args.root,
                cache_dir,
                args.templates,
                args.k,
            )
        ]
    command = " ".join(["python -m experiments.zero_shot", *(argv if argv is not None else sys.argv[1:])])
    (out / "zero_shot.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "zero_shot.md").write_text(markdown_report(results, command))
    log.info("Wrote %s and %s", out / "zero_shot.json", out / "zero_shot.md")


if __name__ == "__main__":
    main()
