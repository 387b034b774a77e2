"""Zero-shot text-to-image search over a gallery index.

- ``query``: combined queries (text, image, plus and minus parts with weights) and the common interface
  of the backends.
- ``concepts``: the offline backend, which describes each image by its CNN's ImageNet classes and
  compares texts with a sentence encoder.
- ``clip``: the ``openclip`` backend, CLIP image and text towers from open_clip. It is imported only
  when used, because importing open_clip takes seconds.
"""

from cbir_lightning.text_search.query import (
    DEFAULT_TEMPLATES,
    QueryPart,
    TextSearchSpace,
    build_query_parts,
    embed_query,
    embed_text,
    rank_scores,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "QueryPart",
    "TextSearchSpace",
    "build_query_parts",
    "embed_query",
    "embed_text",
    "rank_scores",
]
