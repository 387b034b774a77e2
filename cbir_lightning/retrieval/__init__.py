"""Image retrieval: embeddings of a gallery folder, a persistent index of them, and nearest-neighbour search.

- ``embed``: ``Embedder`` turns images into raw ``(N, D)`` float32 backbone features through the feature cache.
- ``index``: ``GalleryIndex`` stores the embeddings of a gallery folder on disk and updates them incrementally.
- ``search``: ``create_backend``/``build_backend`` search the embeddings exactly with torch or with faiss.
"""

from cbir_lightning.retrieval.embed import Embedder, build_embedder
from cbir_lightning.retrieval.index import GalleryIndex, IndexChanges, scan_gallery
from cbir_lightning.retrieval.search import SearchBackend, SearchResult, build_backend, create_backend

__all__ = [
    "Embedder",
    "GalleryIndex",
    "IndexChanges",
    "SearchBackend",
    "SearchResult",
    "build_backend",
    "build_embedder",
    "create_backend",
    "scan_gallery",
]
