"""Nearest-neighbour search over a gallery of embeddings, with an exact torch backend and faiss backends.

Every backend takes raw embeddings (see ``cbir_lightning.retrieval.embed``) and one of two metrics:

- ``cosine`` (default): vectors are L2-normalised on ``add`` and ``search``, and the score is the cosine
  similarity, so higher is better.
- ``euclidean``: raw vectors, and the score is the euclidean (L2) distance, so lower is better. This is
  the baseline that compares unnormalised CNN features.

``SearchResult.higher_is_better`` states the direction, and results are always sorted best first.

Backends:

- ``exact``: a torch matrix product and top-k, with the queries processed in chunks so that memory stays
  bounded. Equal scores are ordered by ascending gallery index, including the choice of which equal
  scores fill the last places.
- ``faiss``: faiss-cpu with a ``flat`` (exact), ``ivf`` (inverted lists, options ``nlist``/``nprobe``) or
  ``hnsw`` (graph, options ``hnsw_m``/``ef_search``/``ef_construction``) index. Equal returned scores
  are ordered by ascending index, but faiss decides which of several equal scores at the last place it
  returns.

``build_backend(vectors, "auto")`` uses ``exact`` up to ``EXACT_MAX_VECTORS`` gallery vectors and faiss
HNSW above that, unless the caller expects fewer than ``APPROXIMATE_MIN_QUERIES`` queries: building an
HNSW graph costs as much as hundreds of exact queries.
"""

import importlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "APPROXIMATE_MIN_QUERIES",
    "BACKEND_NAMES",
    "EXACT_MAX_VECTORS",
    "FAISS_INDEX_TYPES",
    "METRICS",
    "ExactBackend",
    "FaissBackend",
    "SearchBackend",
    "SearchResult",
    "build_backend",
    "create_backend",
]

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[str, ...] = ("cosine", "euclidean")
BACKEND_NAMES: tuple[str, ...] = ("auto", "exact", "faiss")
FAISS_INDEX_TYPES: tuple[str, ...] = ("flat", "ivf", "hnsw")
# Keyword options that create_backend accepts for each backend.
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "exact": ("chunk_size", "device"),
    "faiss": ("index_type", "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"),
}

# Gallery size up to which build_backend(name="auto") searches exactly with torch. A query against 200k
# vectors of 1280 floats reads 1 GB of gallery memory, which is where approximate search starts to pay.
# NOTE: the threshold is an estimate, not a measured crossover.
EXACT_MAX_VECTORS = 200_000
# Queries below which build_backend(name="auto") stays exact at any gallery size. On 2 CPU cores and
# 1024-d vectors the HNSW build (M=32) cost as much as 510 exact queries at 100k vectors (13.3 s against
# 26.0 ms) and 850 at 1M (206 s against 241 ms), so for fewer queries exact search finishes sooner.
APPROXIMATE_MIN_QUERIES = 500
# Score-matrix elements per query chunk of the exact backend: 2**24 float32 scores are 64 MiB, and the
# tie-breaking masks and int32 ranks add about 150 MiB (an estimate from the tensors they create).
EXACT_CHUNK_ELEMENTS = 2**24
# Candidates beyond k whose euclidean distances the exact backend computes again without cancellation.
EUCLIDEAN_EXTRA_CANDIDATES = 64
# Rows per block of the NaN and infinity check: 65,536 rows of 1024 floats make 256 MiB blocks.
FINITE_CHECK_ROWS = 65_536
FAISS_INSTALL_HINT = "pip install faiss-cpu  (or: pip install 'cbir-lightning[retrieval]')"

Exclusions = Sequence[Iterable[int]] | None


@dataclass(frozen=True)
class SearchResult:
    """The best ``k'`` gallery entries for each query, best first.

    ``k' = min(k, gallery size - the largest number of gallery entries excluded for one query)``. The faiss
    IVF and HNSW indexes can find fewer entries than that for some queries. Those queries are searched
    again exhaustively, and if they still come back short, ``k'`` is the smallest number found for any
    query and a warning is logged.
    """

    scores: torch.Tensor
    """``(Q, k')`` float32: cosine similarity for ``metric="cosine"``, euclidean distance for ``"euclidean"``."""
    indices: torch.Tensor
    """``(Q, k')`` int64 row indices into the gallery, never negative."""
    metric: str
    higher_is_better: bool
    """True when a larger score means a closer match (cosine), False for distances (euclidean)."""


class SearchBackend(ABC):
    """A searchable gallery of vectors: ``add`` vectors, then ``search`` it with query vectors."""

    name: str

    def __init__(self, metric: Metric = "cosine") -> None:
        if metric not in METRICS:
            raise ValueError(f"Invalid metric {metric!r}. Choose one of: {', '.join(METRICS)}.")
        self.metric: Metric = metric
        self.dim: int | None = None

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger score means a closer match: True for cosine, False for euclidean."""
        return self.metric == "cosine"

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of gallery vectors."""

    def add(self, vectors: torch.Tensor | np.ndarray) -> None:
        """Append ``(N, D)`` raw vectors to the gallery. Their row indices continue from the current size.

        Raises:
            ValueError: ``vectors`` is not 2-D, contains NaN or infinity, or has another ``D`` than before.
        """
        matrix = self._prepare(vectors, "gallery vectors")
        if len(matrix):
            self._add(matrix)
            self.dim = matrix.shape[1]

    def search(self, queries: torch.Tensor | np.ndarray, k: int, exclude: Exclusions = None) -> SearchResult:
        """Find the ``k`` best gallery entries for each row of ``queries`` (``(Q, D)`` raw vectors).

        Args:
            queries: ``(Q, D)`` vectors from the same embedder as the gallery.
            k: requested number of results per query. Fewer come back when the gallery is smaller; see
                ``SearchResult``.
            exclude: one iterable of gallery row indices per query, which are never returned for that
                query. Pass ``[[i] for i in query_rows]`` when the queries are gallery entries themselves.

        Raises:
            ValueError: ``k`` is below 1, ``queries`` has the wrong shape or non-finite values, or
                ``exclude`` has the wrong length or an index outside the gallery.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k={k!r}: it must be an integer of at least 1.")
        matrix = self._prepare(queries, "queries")
        excluded = _check_exclusions(exclude, len(matrix), len(self))
        max_excluded = max((len(rows) for rows in excluded), default=0)
        k_valid = min(k, len(self) - max_excluded)
        if len(matrix) == 0 or k_valid <= 0:
            return self._result(torch.empty(len(matrix), 0), torch.empty(len(matrix), 0, dtype=torch.int64))
        scores, indices = self._search(matrix, k_valid, excluded)
        return self._result(scores, indices)

    @abstractmethod
    def _add(self, matrix: torch.Tensor) -> None:
        """Append prepared ``(N, D)`` float32 vectors, normalised already for cosine."""

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int, excluded: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores, indices)`` with ``k`` valid results per query, best first and never negative.

        ``k`` is at most the gallery size minus the excluded entries of any query.
        """

    def _prepare(self, vectors: torch.Tensor | np.ndarray, description: str) -> torch.Tensor:
        matrix = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
        if matrix.ndim != 2:
            raise ValueError(
                f"Invalid {description}: expected a 2-D (N, D) matrix, got shape {tuple(matrix.shape)}. "
                "Reshape a single vector with .reshape(1, -1)."
            )
        if self.dim is not None and len(matrix) and matrix.shape[1] != self.dim:
            raise ValueError(
                f"Invalid {description}: dimension {matrix.shape[1]} does not match the gallery dimension {self.dim}. "
                "Embed queries and gallery with the same backbone, weights and preprocessing."
            )
        if not _all_finite(matrix):
            raise ValueError(f"Invalid {description}: the matrix contains NaN or infinite values.")
        if self.metric == "cosine":
            matrix = F.normalize(matrix, dim=1)
        return matrix.contiguous()

    def _result(self, scores: torch.Tensor, indices: torch.Tensor) -> SearchResult:
        return SearchResult(
            scores=scores.float(),
            indices=indices.long(),
            metric=self.metric,
            higher_is_better=self.higher_is_better,
        )


class ExactBackend(SearchBackend):
    """Brute-force search with torch: every query is scored against every gallery vector.

    Args:
        metric: ``cosine`` or ``euclidean``.
        chunk_size: queries scored at once. ``None`` picks a size that keeps the score matrix of a chunk
            near ``EXACT_CHUNK_ELEMENTS`` elements.
        device: torch device that stores the gallery and computes the scores.
    """

    name = "exact"

    def __init__(
        self, metric: Metric = "cosine", chunk_size: int | None = None, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(metric)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size={chunk_size}: it must be at least 1, or None to pick one.")
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self._gallery = torch.empty(0, 0, device=self.device)
        self._squared_norms = torch.empty(0, device=self.device)

    def __len__(self) -> int:
        return len(self._gallery)

    def _add(self, matrix: torch.Tensor) -> None:
        matrix = matrix.to(self.device)
        self._gallery = matrix if len(self._gallery) == 0 else torch.cat([self._gallery, matrix])
        if not self.higher_is_better:
            # A norm reduction, unlike square().sum(), makes no temporary copy of the whole gallery.
            self._squared_norms = torch.linalg.vector_norm(self._gallery, dim=1).square_()

    def _search(self, queries: torch.Tensor, k: int, excluded: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_size = self.chunk_size or max(1, EXACT_CHUNK_ELEMENTS // len(self))
        all_scores, all_indices = [], []
        for start in range(0, len(queries), chunk_size):
            chunk = queries[start : start + chunk_size].to(self.device)
            # Work in "larger is better" keys: similarities as they are, squared distances negated.
            keys = chunk @ self._gallery.T if self.higher_is_better else -self._squared_distances(chunk)
            for row, rows_to_drop in enumerate(excluded[start : start + chunk_size]):
                if rows_to_drop:
                    keys[row, list(rows_to_drop)] = -math.inf
            if self.higher_is_better:
                scores, indices = _top_k_lowest_index_first(keys, k)
            else:
                scores, indices = self._nearest_by_exact_distance(chunk, keys, k)
            all_scores.append(scores.cpu())
            all_indices.append(indices.cpu())
        return torch.cat(all_scores), torch.cat(all_indices)

    def _squared_distances(self, queries: torch.Tensor) -> torch.Tensor:
        # |q - g|^2 = |q|^2 + |g|^2 - 2 q.g, one matrix product. In float32 it loses the small distances
        # of large vectors to cancellation, so it only preselects candidates.
        return queries.square().sum(dim=1, keepdim=True) + self._squared_norms - 2 * (queries @ self._gallery.T)

    def _nearest_by_exact_distance(
        self, queries: torch.Tensor, keys: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the distances and indices of the ``k`` nearest gallery rows, ties by ascending index.

        The ``k + EUCLIDEAN_EXTRA_CANDIDATES`` best ``keys`` (negated squared distances from
        ``_squared_distances``) are candidates, and their distances are computed again from the vector
        differences, which have no cancellation.
        NOTE: a true neighbour is missed only when more than ``EUCLIDEAN_EXTRA_CANDIDATES`` others lie
        within the rounding error of the k-th squared distance.
        """
        count = min(keys.shape[1], k + EUCLIDEAN_EXTRA_CANDIDATES)
        candidate_keys, candidates = _top_k_lowest_index_first(keys, count)
        distances = torch.empty(candidates.shape, dtype=self._gallery.dtype, device=self._gallery.device)
        # NOTE: one query row is the smallest block, so k of many thousands takes k x D floats twice.
        rows_per_block = max(1, EXACT_CHUNK_ELEMENTS // (count * self._gallery.shape[1]))
        for start in range(0, len(queries), rows_per_block):
            block = slice(start, start + rows_per_block)
            differences = queries[block, None, :] - self._gallery[candidates[block]]
            distances[block] = torch.linalg.vector_norm(differences, dim=2)
        distances[candidate_keys == -math.inf] = math.inf
        # Sort the candidates by index, then stably by distance, so that equal distances keep index order.
        candidates, by_index = candidates.sort(dim=1)
        distances = distances.gather(1, by_index)
        order = torch.sort(distances, dim=1, stable=True).indices[:, :k]
        return distances.gather(1, order), candidates.gather(1, order)


def _top_k_lowest_index_first(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` largest keys of each row and their column indices, ties taken by ascending index.

    ``torch.topk`` does not specify which of several equal values it returns, so its k-th largest value
    serves only as a threshold. Every key above the threshold is taken, and the remaining places go to the
    keys equal to it with the lowest indices.
    """
    threshold = torch.topk(keys, k, dim=1).values[:, -1:]
    above = keys > threshold
    at_threshold = keys == threshold
    places_left = k - above.sum(dim=1, keepdim=True)
    rank_among_ties = at_threshold.cumsum(dim=1, dtype=torch.int32)
    chosen = above | (at_threshold & (rank_among_ties <= places_left))
    # Exactly k entries per row are chosen, and nonzero lists them row by row in ascending column order.
    indices = chosen.nonzero()[:, 1].reshape(len(keys), k)
    selected = keys.gather(1, indices)
    # A stable sort keeps equal keys in ascending index order.
    order = torch.sort(selected, dim=1, descending=True, stable=True).indices
    return selected.gather(1, order), indices.gather(1, order)


class FaissBackend(SearchBackend):
    """Search with a faiss-cpu index. Cosine is inner product on L2-normalised vectors.

    Args:
        metric: ``cosine`` or ``euclidean``.
        index_type: ``flat`` (exact), ``ivf`` (``IndexIVFFlat``) or ``hnsw`` (``IndexHNSWFlat``).
        nlist: IVF only, number of inverted lists (k-means clusters), trained on the first ``add``.
            ``None`` uses ``round(sqrt(N))`` of that first ``add``, a common rule of thumb. Faiss warns when
            there are fewer than 39 training vectors per list.
        nprobe: IVF only, lists visited per query (default 8). Higher is slower and finds more. A query that
            finds fewer than ``k`` entries is searched again with every list visited.
        hnsw_m: HNSW only, neighbours per graph node (default 32).
        ef_search: HNSW only, candidate list size while searching (default 128, raised to ``k`` when lower).
            On 1M synthetic clustered 1024-d vectors, recall@12 was 0.947 at 64 and 0.971 at 128.
            A query that finds fewer than ``k`` entries is searched again with a list as large as the gallery.
        ef_construction: HNSW only, candidate list size while adding (default 40).

    Raises:
        ImportError: faiss is not installed; the message has the pip command.
        ValueError: unknown ``index_type``, or an option that does not belong to ``index_type``.
    """

    name = "faiss"

    def __init__(
        self,
        metric: Metric = "cosine",
        index_type: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int | None = None,
        ef_search: int | None = None,
        ef_construction: int | None = None,
    ) -> None:
        super().__init__(metric)
        if index_type not in FAISS_INDEX_TYPES:
            raise ValueError(f"Invalid faiss index_type {index_type!r}. Choose one of: {', '.join(FAISS_INDEX_TYPES)}.")
        options = {
            "nlist": nlist,
            "nprobe": nprobe,
            "hnsw_m": hnsw_m,
            "ef_search": ef_search,
            "ef_construction": ef_construction,
        }
        _check_faiss_options(index_type, options)
        self.faiss = _import_faiss()
        self.index_type = index_type
        self.nlist = nlist
        self.nprobe = nprobe if nprobe is not None else 8
        self.hnsw_m = hnsw_m if hnsw_m is not None else 32
        self.ef_search = ef_search if ef_search is not None else 128
        self.ef_construction = ef_construction if ef_construction is not None else 40
        self._index: Any = None

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _add(self, matrix: torch.Tensor) -> None:
        vectors = np.ascontiguousarray(matrix.numpy(), dtype=np.float32)
        if self._index is None:
            self._index = self._create_index(vectors)
        self._index.add(vectors)

    def _create_index(self, first_vectors: np.ndarray) -> Any:
        faiss = self.faiss
        count, dim = first_vectors.shape
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.index_type == "flat":
            return faiss.IndexFlatIP(dim) if self.metric == "cosine" else faiss.IndexFlatL2(dim)
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss_metric)
            index.hnsw.efConstruction = self.ef_construction
            return index
        nlist = self.nlist if self.nlist is not None else max(1, round(math.sqrt(count)))
        if nlist > count:
            raise ValueError(
                f"Invalid nlist={nlist}: IVF training needs at least nlist vectors in the first add, got {count}. "
                "Lower nlist, or use index_type='flat' for a gallery this small."
            )
        quantizer = faiss.IndexFlatIP(dim) if self.metric == "cosine" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
        index.train(first_vectors)
        log.info("Trained faiss IVF index with nlist=%d on %d vectors", nlist, count)
        return index

    def _search(self, queries: torch.Tensor, k: int, excluded: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = np.ascontiguousarray(queries.numpy())
        rows = self._search_rows(vectors, k, excluded, exhaustive=False)
        short = [row for row, (_, indices) in enumerate(rows) if len(indices) < k]
        if short and self.index_type != "flat":
            # IVF lists and the HNSW candidate list can hold fewer than k entries, and faiss pads the
            # missing places with -1. Search these queries again with every list probed (IVF) or with a
            # candidate list as large as the gallery (HNSW).
            retried = self._search_rows(vectors[short], k, [excluded[row] for row in short], exhaustive=True)
            for row, result in zip(short, retried, strict=True):
                rows[row] = result

        found = min(len(indices) for _, indices in rows)
        if found < k:
            log.warning(
                "Faiss %s search found fewer than %d results for %d of %d queries, so every query returns %d.",
                self.index_type,
                k,
                sum(1 for _, indices in rows if len(indices) < k),
                len(queries),
                found,
            )
        scores = torch.stack([torch.as_tensor(row_scores[:found]) for row_scores, _ in rows])
        indices = torch.stack([torch.as_tensor(row_indices[:found]) for _, row_indices in rows])
        return scores, indices

    def _search_rows(
        self, vectors: np.ndarray, k: int, excluded: list[set[int]], exhaustive: bool
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Search and return per query the valid results, best first, without -1 padding or excluded rows."""
        max_excluded = max((len(rows) for rows in excluded), default=0)
        k_search = min(len(self), k + max_excluded)
        if self.index_type == "ivf":
            self._index.nprobe = self._index.nlist if exhaustive else self.nprobe
        elif self.index_type == "hnsw":
            self._index.hnsw.efSearch = len(self) if exhaustive else max(self.ef_search, k_search)
        raw_scores, raw_indices = self._index.search(vectors, k_search)
        if self.metric == "euclidean":
            # Faiss L2 indexes return squared distances.
            raw_scores = np.sqrt(np.maximum(raw_scores, 0))
        return [
            _clean_faiss_row(raw_scores[row], raw_indices[row], excluded[row], self.higher_is_better)
            for row in range(len(vectors))
        ]


def _clean_faiss_row(
    scores: np.ndarray, indices: np.ndarray, excluded: set[int], higher_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Drop faiss's -1 padding and the excluded rows, then order by score and by ascending index on ties."""
    keep = indices >= 0
    if excluded:
        keep &= ~np.isin(indices, list(excluded))
    scores, indices = scores[keep], indices[keep].astype(np.int64)
    primary = -scores if higher_is_better else scores
    # np.lexsort sorts by the last key first.
    order = np.lexsort((indices, primary))
    return scores[order].astype(np.float32), indices[order]


def _all_finite(matrix: torch.Tensor) -> bool:
    """Return whether every value is finite, checking row blocks to bound the temporaries.

    ``torch.isfinite`` on the whole matrix allocates about 1.7 times its size (an absolute-value copy and
    boolean masks), which is 7 GiB for 1M 1024-d float32 vectors.
    """
    return all(bool(torch.isfinite(block).all()) for block in matrix.split(FINITE_CHECK_ROWS))


def _check_faiss_options(index_type: str, options: dict[str, int | None]) -> None:
    applicable = {"flat": set(), "ivf": {"nlist", "nprobe"}, "hnsw": {"hnsw_m", "ef_search", "ef_construction"}}
    for option, value in options.items():
        if value is None:
            continue
        if option not in applicable[index_type]:
            allowed = ", ".join(sorted(applicable[index_type])) or "none"
            raise ValueError(
                f"Option {option}={value} does not apply to faiss index_type={index_type!r} "
                f"(options for {index_type}: {allowed})."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {option}={value!r}: it must be an integer of at least 1.")


def _import_faiss() -> Any:
    # faiss's loader logs at INFO level each instruction-set build that it tries and does not find.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return importlib.import_module("faiss")
    except ImportError as error:
        raise ImportError(
            f"The faiss search backend needs faiss, which is not installed. Install it with: {FAISS_INSTALL_HINT}"
        ) from error


def _check_exclusions(exclude: Exclusions, query_count: int, gallery_size: int) -> list[set[int]]:
    if exclude is None:
        return [set() for _ in range(query_count)]
    if len(exclude) != query_count:
        raise ValueError(
            f"Invalid exclude: it has {len(exclude)} entries for {query_count} queries. "
            "Pass one iterable of gallery indices per query, empty where nothing is excluded."
        )
    excluded = []
    for query, rows in enumerate(exclude):
        row_set = {int(row) for row in rows}
        outside = sorted(row for row in row_set if not 0 <= row < gallery_size)
        if outside:
            raise ValueError(
                f"Invalid exclude for query {query}: gallery indices {outside} are outside 0..{gallery_size - 1}."
            )
        excluded.append(row_set)
    return excluded


def create_backend(name: str, metric: Metric = "cosine", **options: Any) -> SearchBackend:
    """Create an empty search backend by name: ``exact`` or ``faiss``.

    ``options`` go to ``ExactBackend`` (``chunk_size``, ``device``) or ``FaissBackend`` (``index_type``,
    ``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``ef_construction``). ``auto`` needs the gallery size,
    so it is only accepted by ``build_backend``.

    Raises:
        ValueError: unknown backend name or metric, ``name="auto"``, or an option that the backend does not
            take.
        ImportError: ``faiss`` requested but not installed.
    """
    if name in BACKEND_OPTIONS:
        _check_backend_options(name, options)
    if name == "exact":
        return ExactBackend(metric, **options)
    if name == "faiss":
        return FaissBackend(metric, **options)
    if name == "auto":
        raise ValueError(
            "Backend 'auto' picks exact or faiss from the gallery size: call build_backend(vectors, 'auto') "
            "instead of create_backend."
        )
    raise ValueError(f"Invalid search backend {name!r}. Choose one of: {', '.join(BACKEND_NAMES)}.")


def _check_backend_options(name: str, options: dict[str, Any], chosen_by_auto: bool = False) -> None:
    unknown = sorted(set(options) - set(BACKEND_OPTIONS[name]))
    if not unknown:
        return
    owners = [other for other, accepted in BACKEND_OPTIONS.items() if set(unknown) <= set(accepted)]
    hint = f" They are options of backend={owners[0]}." if owners else ""
    if chosen_by_auto:
        raise ValueError(
            f"Backend 'auto' chose {name!r} here, which does not take the options {unknown}.{hint} "
            "Name the backend that they belong to."
        )
    raise ValueError(
        f"Invalid options {unknown} for search backend {name!r}, which takes: {', '.join(BACKEND_OPTIONS[name])}.{hint}"
    )


def build_backend(
    vectors: torch.Tensor | np.ndarray,
    name: str = "auto",
    metric: Metric = "cosine",
    expected_queries: int | None = None,
    **options: Any,
) -> SearchBackend:
    """Create a backend and add the ``(N, D)`` gallery ``vectors`` to it.

    ``auto`` uses ``exact`` up to ``EXACT_MAX_VECTORS`` vectors and faiss HNSW above that, or ``exact``
    with a warning when faiss is not installed. ``expected_queries`` below ``APPROXIMATE_MIN_QUERIES``
    keeps ``auto`` exact at any size; ``None`` means many. Options go to the chosen backend, as in
    ``create_backend``.
    """
    if name == "auto":
        if expected_queries is not None and expected_queries < APPROXIMATE_MIN_QUERIES:
            log.debug("%d expected queries: exact search, which needs no index build", expected_queries)
            name = "exact"
        else:
            name = _choose_backend(len(vectors))
        _check_backend_options(name, options, chosen_by_auto=True)
        if name == "faiss":
            options = {"index_type": "hnsw", **options}
    backend = create_backend(name, metric, **options)
    backend.add(vectors)
    return backend


def _choose_backend(gallery_size: int) -> str:
    if gallery_size <= EXACT_MAX_VECTORS:
        return "exact"
    try:
        _import_faiss()
    except ImportError:
        log.warning(
            "Gallery of %d vectors is above %d, where approximate search with faiss pays off, but faiss is "
            "not installed, so the exact backend is used. Install it with: %s",
            gallery_size,
            EXACT_MAX_VECTORS,
            FAISS_INSTALL_HINT,
        )
        return "exact"
    log.info("Gallery of %d vectors is above %d: using the faiss HNSW backend", gallery_size, EXACT_MAX_VECTORS)
    return "faiss"
