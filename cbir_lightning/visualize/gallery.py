"""Result galleries: a query and its ranked results as a PNG grid and as a self-contained HTML page.

Images are drawn upright (EXIF orientation applied). When classes are known, each result gets a green
frame if its class matches the query's and a red one if not. A query without an image, such as a text
query, is drawn as its label in an empty cell.
"""

import base64
import html
import io
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from cbir_lightning.data.decode import load_rgb_image  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["GalleryItem", "write_gallery_html", "write_gallery_png"]

MATCH_COLOUR = "#2ca02c"
MISMATCH_COLOUR = "#d62728"
QUERY_COLOUR = "#1f77b4"
THUMBNAIL_SIZE = 256  # maximum width and height, in pixels, of the images embedded in the HTML page
TEXT_CELL_WIDTH = 28  # characters per line of a text-only cell in the PNG grid


@dataclass(frozen=True)
class GalleryItem:
    """One cell of a gallery: the query (rank 0) or a result."""

    path: Path | None  # None draws ``label`` in an empty cell, for a query that is only text
    rank: int  # 0 for the query, 1 for the best result
    label: str  # the line under the image, e.g. "horses" or the file name
    score_text: str = ""  # e.g. "cos 0.873" or "d 12.4"
    class_name: str | None = None


def _frame_colour(item: GalleryItem, query: GalleryItem) -> str:
    if item.rank == 0:
        return QUERY_COLOUR
    if item.class_name is None or query.class_name is None:
        return "#777777"
    return MATCH_COLOUR if item.class_name == query.class_name else MISMATCH_COLOUR


def _caption(item: GalleryItem) -> str:
    heading = "query" if item.rank == 0 else f"#{item.rank}"
    # A text-only cell already shows its label inside the cell.
    parts = [heading if item.path is None else f"{heading}: {item.label}"]
    if item.score_text:
        parts.append(item.score_text)
    return "\n".join(parts)


def write_gallery_png(query: GalleryItem, results: Sequence[GalleryItem], path: Path, columns: int = 5) -> None:
    """Draw the query and its results as a grid, each captioned with its rank, label and score."""
    items = [query, *results]
    rows = math.ceil(len(items) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 2.5), squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, item in zip(axes_grid.flat, items, strict=False):
        if item.path is None:
            _draw_text_cell(axes, item.label)
        else:
            axes.imshow(load_rgb_image(item.path))
        axes.set_title(_caption(item), fontsize=8, color=_frame_colour(item, query))
        colour = _frame_colour(item, query)
        for spine in axes.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(colour)
            spine.set_linewidth(3 if item.rank == 0 else 2)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.axis("on")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _draw_text_cell(axes: plt.Axes, text: str) -> None:
    wrapped = "\n".join(textwrap.wrap(text, TEXT_CELL_WIDTH)[:8])
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=9, wrap=True)


def image_data_uri(path: Path, size: int = THUMBNAIL_SIZE) -> str:
    """Return an upright, down-scaled JPEG of ``path`` as a ``data:`` URI for embedding in HTML."""
    image = load_rgb_image(path)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 200px; text-align: center; }
figure img { width: 196px; height: 196px; object-fit: contain; background: #f4f4f4; border: 4px solid #777; }
figcaption { font-size: 0.85em; margin-top: 4px; word-break: break-all; }
.text-cell { width: 196px; height: 196px; border: 4px solid #777; background: #f4f4f4; display: flex;
  align-items: center; justify-content: center; overflow: auto; font-size: 1.05em; padding: 0 6px;
  box-sizing: border-box; }
.meta { color: #555; font-size: 0.9em; margin-bottom: 1em; }
"""


def _figure_html(item: GalleryItem, query: GalleryItem) -> str:
    colour = _frame_colour(item, query)
    heading = "query" if item.rank == 0 else f"#{item.rank}"
    score = f"<br>{html.escape(item.score_text)}" if item.score_text else ""
    if item.path is None:
        cell = f'<div class="text-cell" style="border-color: {colour}">{html.escape(item.label)}</div>'
        return f"<figure>{cell}<figcaption><b>{heading}</b>{score}</figcaption></figure>"
    caption = f"<figcaption><b>{heading}</b>: {html.escape(item.label)}{score}</figcaption>"
    return (
        f'<figure><img src="{image_data_uri(item.path)}" alt="{html.escape(item.path.name)}" '
        f'style="border-color: {colour}" title="{html.escape(str(item.path))}">{caption}</figure>'
    )


def write_gallery_html(
    query: GalleryItem, results: Sequence[GalleryItem], path: Path, title: str, details: Sequence[str] = ()
) -> None:
    """Write one HTML page with every image embedded, so it opens in a browser without a server."""
    figures = "\n".join(_figure_html(item, query) for item in [query, *results])
    meta = "".join(f"<div>{html.escape(line)}</div>" for line in details)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><div class="meta">{meta}</div>'
        f'<div class="grid">\n{figures}\n</div></body></html>\n'
    )
    path.write_text(page, encoding="utf-8")
