"""Combined queries: text and image parts, each embedded, weighted, summed and L2-normalised.

A query such as ``text="horse" plus="beach" minus="snow"`` becomes

    q = normalise(w_text * e("horse") + w_plus * e("beach") - w_minus * e("snow"))

where ``e`` is the backend's unit-length embedding of one part. A text part is embedded once per prompt
template (``"a photo of {}."`` and so on), and the normalised mean of those embeddings is its ``e``, as in
CLIP's zero-shot recipe. An image part is embedded by the backend's image encoder.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F  # noqa: N812

from cbir_lightning.retrieval.embed import Embedder

__all__ = [
    "DEFAULT_TEMPLATES",
    "QUERY_ROLES",
    "QueryEncoder",
    "QueryPart",
    "TextSearchSpace",
    "apply_templates",
    "build_query_parts",
    "embed_query",
    "embed_text",
    "format_query",
    "rank_scores",
]

# The text exactly as typed: a free-text query is usually a whole phrase already.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}",)
QueryRole = Literal["text", "plus", "minus", "image"]
QUERY_ROLES: tuple[str, ...] = ("text", "plus", "minus", "image")
# A combined query vector shorter than this before normalisation has no direction, e.g. text=x minus=x.
MIN_QUERY_NORM = 1e-6


class QueryEncoder(Protocol):
    """The embedding functions that a text search backend provides for queries."""

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return ``(len(texts), D)`` float32 unit-length embeddings, in order."""
        ...

    def encode_image_file(self, path: Path) -> torch.Tensor:
        """Return the ``(D,)`` float32 unit-length embedding of one image file."""
        ...


class TextSearchSpace(QueryEncoder, Protocol):
    """A text search backend: a gallery embedder, query encoders and the gallery scoring.

    ``embedder`` builds the ``GalleryIndex`` of raw vectors, ``gallery_matrix`` turns those vectors into
    the rows that ``score`` compares with a query vector, and a higher score means a better match.
    """

    backend: str
    embedder: Embedder

    @property
    def score_name(self) -> str:
        """What the scores mean, for reports."""
        ...

    def describe(self) -> dict[str, Any]:
        """Return the backend's configuration for reports."""
        ...

    def gallery_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the ``(N, D)`` rows to score from ``(N, F)`` raw index vectors."""
        ...

    def score(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Return the ``(N,)`` scores of the gallery rows for a ``(D,)`` unit-length query vector."""
        ...

    def result_details(self, embeddings: torch.Tensor) -> list[dict[str, Any]]:
        """Return extra report fields for each of ``(N, F)`` raw index vectors, such as class names."""
        ...


@dataclass(frozen=True)
class QueryPart:
    """One part of a combined query."""

    role: QueryRole
    """``text``, ``plus`` and ``minus`` are texts, ``image`` is an image file."""
    value: str
    """The text, or the path of the image file."""
    weight: float
    """Coefficient in the weighted sum: the configured weight, negated for ``minus`` parts."""

    @property
    def is_image(self) -> bool:
        """Whether the part is an image file rather than a text."""
        return self.role == "image"

    def to_dict(self) -> dict[str, str | float]:
        """Return the part as a JSON-ready dictionary."""
        return {"role": self.role, "value": self.value, "weight": self.weight}


def build_query_parts(
    text: str | None = None,
    image: str | Path | None = None,
    plus: str | Iterable[str] | None = None,
    minus: str | Iterable[str] | None = None,
    weights: dict[str, float] | None = None,
) -> list[QueryPart]:
    """Collect the non-empty query parts in the order text, image, plus, minus.

    ``plus`` and ``minus`` take one text or a list of texts. ``weights`` maps a role to its weight (default
    1.0 each). A ``minus`` part enters the sum with the negated weight.

    Raises:
        ValueError: no part is given, a weight is not a finite number, or ``weights`` has an unknown role.
        FileNotFoundError: ``image`` is not an existing file.
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(QUERY_ROLES))
    if unknown:
        raise ValueError(f"Invalid query weight roles {unknown}. Choose from: {', '.join(QUERY_ROLES)}.")
    resolved = {role: _check_weight(role, weights.get(role, 1.0)) for role in QUERY_ROLES}

    parts: list[QueryPart] = []
    if text is not None and str(text).strip():
        parts.append(QueryPart("text", str(text).strip(), resolved["text"]))
    if image is not None and str(image).strip():
        path = Path(str(image)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Query image {str(path)!r} not found. Pass image=<image file>.")
        parts.append(QueryPart("image", str(path.resolve()), resolved["image"]))
    parts.extend(QueryPart("plus", value, resolved["plus"]) for value in _texts(plus))
    parts.extend(QueryPart("minus", value, -resolved["minus"]) for value in _texts(minus))
    if not parts:
        raise ValueError(
            'The query is empty. Pass text="a photo of a horse", image=<image file>, or both; '
            "plus=... and minus=... add and subtract further texts."
        )
    return parts


def format_query(parts: Sequence[QueryPart]) -> str:
    """Return a one-line description such as ``horse + beach - 0.5 x snow``, naming image parts by file name."""
    pieces = []
    for position, part in enumerate(parts):
        value = Path(part.value).name if part.is_image else part.value
        magnitude = abs(part.weight)
        term = value if magnitude == 1 else f"{magnitude:g} x {value}"
        if position == 0:
            pieces.append(term if part.weight >= 0 else f"- {term}")
        else:
            pieces.append(f"{'+' if part.weight >= 0 else '-'} {term}")
    return " ".join(pieces)


def _check_weight(role: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(f"Invalid query weight for {role}: {weight!r}. It must be a finite number.")
    return float(weight)


def _texts(values: str | Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [str(value).strip() for value in values if str(value).strip()]


def apply_templates(text: str, templates: Sequence[str]) -> list[str]:
    """Return ``text`` inserted into each template at its ``{}`` placeholder.

    Raises:
        ValueError: ``templates`` is empty, or a template has no ``{}`` or more than one.
    """
    if not templates:
        raise ValueError('Invalid templates: the list is empty. Use ["{}"] to embed the text as typed.')
    prompts = []
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"Invalid template {template!r}: it must contain exactly one {{}} for the text.")
        prompts.append(template.replace("{}", text))
    return prompts


def embed_text(encoder: QueryEncoder, text: str, templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Return the ``(D,)`` unit-length prompt-ensemble embedding of ``text``: the normalised template mean."""
    embeddings = encoder.encode_texts(apply_templates(text, templates))
    return F.normalize(embeddings.float().mean(dim=0), dim=0)


def embed_query(
    encoder: QueryEncoder, parts: Sequence[QueryPart], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """Return the ``(D,)`` unit-length query vector: the normalised weighted sum of the parts' embeddings.

    Raises:
        ValueError: ``parts`` is empty, or the weighted sum is (nearly) zero, for example when a text is
            added and subtracted with the same weight.
    """
    if not parts:
        raise ValueError("Cannot embed an empty query: pass at least one text or image part.")
    total = None
    for part in parts:
        if part.is_image:
            vector = F.normalize(encoder.encode_image_file(Path(part.value)).float(), dim=0)
        else:
            vector = embed_text(encoder, part.value, templates)
        total = part.weight * vector if total is None else total + part.weight * vector
    norm = float(total.norm())
    if norm < MIN_QUERY_NORM:
        described = ", ".join(f"{part.role}={part.value!r} (weight {part.weight:g})" for part in parts)
        raise ValueError(
            f"The weighted sum of the query parts is zero, so the query has no direction: {described}. "
            "Change the parts or their weights."
        )
    return total / norm


def rank_scores(scores: torch.Tensor, k: int, exclude: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` highest ``scores`` and their indices, best first, equal scores by ascending index.

    Indices in ``exclude`` are never returned. Fewer than ``k`` come back when fewer are left.

    Raises:
        ValueError: ``k`` is below 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k={k!r}: it must be an integer of at least 1.")
    keys = scores.detach().float().clone()
    excluded = sorted(set(exclude))
    if excluded:
        keys[excluded] = -math.inf
    order = torch.sort(keys, descending=True, stable=True).indices
    order = order[: min(k, len(keys) - len(excluded))]
    return scores[order].float(), order
