"""Explained retrieval pictures: each image beside its heat maps, as a PNG grid and as an HTML page
whose buttons switch every image between the plain view and each kind of map."""

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cbir_lightning.explain.retrieval import RetrievalMaps, overlay  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["item_views", "write_explained_html", "write_explained_png"]

ITEMS_PER_ROW = 2


def item_views(maps: RetrievalMaps) -> list[dict[str, np.ndarray]]:
    """Return, for the query and each result, its named views as uint8 RGB arrays: plain first, then maps."""
    views = []
    for row, view in enumerate(maps.views):
        named = {"plain": (view * 255).round().astype(np.uint8)}
        if maps.class_maps is not None:
            named["class"] = overlay(view, maps.class_maps[row])
        if maps.similarity_results is not None:
            if row == 0:
                # The query's map averages what each of the results matched in it.
                named["similarity"] = overlay(view, maps.similarity_query.mean(axis=0))
            else:
                named["similarity"] = overlay(view, maps.similarity_results[row - 1])
                named["query region"] = overlay(maps.views[0], maps.similarity_query[row - 1])
        views.append(named)
    return views


def _captions(report: dict[str, Any], maps: RetrievalMaps) -> list[str]:
    score = report["score"]
    captions = [f"query: {report['query']['class'] or Path(report['query']['path']).name}"]
    for item in report["results"]:
        captions.append(f"#{item['rank']}: {item['class'] or Path(item['path']).name}  ({score} {item[score]:.3f})")
    if maps.class_names:
        captions = [f"{caption}\npredicted: {name}" for caption, name in zip(captions, maps.class_names, strict=True)]
    return captions


def write_explained_png(report: dict[str, Any], maps: RetrievalMaps, path: Path) -> None:
    """Draw every image beside its heat maps, two images per row."""
    views = item_views(maps)
    names = [name for name in views[0] if name != "query region"]
    captions = _captions(report, maps)
    rows = -(-len(views) // ITEMS_PER_ROW)
    columns = ITEMS_PER_ROW * len(names)
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.4), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for index, (named, caption) in enumerate(zip(views, captions, strict=True)):
        row, slot = divmod(index, ITEMS_PER_ROW)
        for offset, name in enumerate(names):
            axes = grid[row, slot * len(names) + offset]
            axes.imshow(named[name])
            axes.set_title(caption if offset == 0 else f"{name} map", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 230px; text-align: center; }
figure img { width: 224px; height: 224px; object-fit: contain; display: none; border: 3px solid #ccc; }
figcaption { font-size: 0.85em; white-space: pre-line; }
.controls { margin: 1em 0; }
"""
_SCRIPT = """
function show(name) {
  document.querySelectorAll('figure').forEach(function (figure) {
    var images = figure.querySelectorAll('img');
    var shown = false;
    images.forEach(function (image) { image.style.display = image.dataset.view === name ? 'inline' : 'none';
      shown = shown || image.dataset.view === name; });
    if (!shown) { images[0].style.display = 'inline'; }
  });
}
"""


def write_explained_html(report: dict[str, Any], maps: RetrievalMaps, path: Path, title: str) -> None:
    """Write one self-contained page; buttons switch all images between the plain view and each map."""
    views = item_views(maps)
    names = list(dict.fromkeys(name for named in views for name in named))
    buttons = "".join(
        f'<label><input type="radio" name="view" onclick="show(\'{name}\')"{" checked" if name == "plain" else ""}>'
        f"{html.escape(name)}</label> "
        for name in names
    )
    figures = []
    for named, caption in zip(views, _captions(report, maps), strict=True):
        images = "".join(
            f'<img data-view="{name}" src="{_data_uri(pixels)}" alt="{html.escape(name)}">'
            for name, pixels in named.items()
        )
        figures.append(f"<figure>{images}<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
        f"<body onload=\"show('plain')\"><h1>{html.escape(title)}</h1>"
        f'<div class="controls">Show: {buttons}</div>'
        "<p>similarity: what in each result matches the query (on the query: the average over the results). "
        "query region: what in the query that result matched. class: what made the classifier predict its class."
        "</p>"
        f'<div class="grid">{"".join(figures)}</div></body></html>\n'
    )
    path.write_text(page, encoding="utf-8")
