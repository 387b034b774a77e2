"""Search backends: exact torch search against a numpy reference, faiss indexes against exact search."""

import logging
import sys

import numpy as np
import pytest
import torch

from cbir_lightning.retrieval import search
from cbir_lightning.retrieval.search import ExactBackend, build_backend, create_backend


def random_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)


def clustered_vectors(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Overlapping Gaussian clusters: structure an index can use, but close enough that wrong results show.

    With these settings, searching with the other metric finds only about 0.7 of the true 10 neighbours.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.0, size=(clusters, dim))
    return (centres[rng.integers(0, clusters, count)] + rng.normal(size=(count, dim))).astype(np.float32)


def reference_search(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Score every pair in float64 and sort best first, ties by ascending index."""
    gallery, queries = gallery.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = queries @ gallery.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = np.linalg.norm(queries[:, None, :] - gallery[None, :, :], axis=2)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def recall_at_k(found: torch.Tensor, expected: torch.Tensor) -> float:
    hits = [len(set(row) & set(truth)) for row, truth in zip(found.tolist(), expected.tolist(), strict=True)]
    return sum(hits) / expected.numel()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_exact_matches_numpy_reference(metric: str, k: int) -> None:
    gallery = random_vectors(40, 16, seed=0)
    queries = random_vectors(7, 16, seed=1)

    result = build_backend(gallery, "exact", metric).search(queries, k)
    expected_scores, expected_indices = reference_search(gallery, queries, k, metric)

    assert result.indices.shape == (7, k)
    assert result.indices.dtype == torch.int64
    assert result.scores.dtype == torch.float32
    np.testing.assert_array_equal(result.indices.numpy(), expected_indices)
    np.testing.assert_allclose(result.scores.numpy(), expected_scores, atol=1e-4)


@pytest.mark.parametrize(("metric", "higher_is_better"), [("cosine", True), ("euclidean", False)])
def test_result_states_score_direction(metric: str, higher_is_better: bool) -> None:
    gallery = random_vectors(30, 8, seed=2)

    result = build_backend(gallery, "exact", metric).search(gallery[:5], 10)

    assert result.metric == metric
    assert result.higher_is_better is higher_is_better
    steps = result.scores.diff(dim=1)
    assert bool((steps <= 0).all()) if higher_is_better else bool((steps >= 0).all())


def test_cosine_ignores_vector_length() -> None:
    gallery = random_vectors(20, 8, seed=3)
    backend = build_backend(gallery, "exact", "cosine")

    plain = backend.search(gallery[:4], 5)
    scaled = backend.search(gallery[:4] * 50.0, 5)

    torch.testing.assert_close(plain.scores, scaled.scores)
    assert torch.equal(plain.indices, scaled.indices)
    torch.testing.assert_close(plain.scores[:, 0], torch.ones(4))


def test_euclidean_uses_raw_vectors() -> None:
    gallery = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 2.0]], dtype=np.float32)

    result = build_backend(gallery, "exact", "euclidean").search(np.array([[9.0, 0.0]]), 3)

    assert result.indices.tolist() == [[1, 0, 2]]
    torch.testing.assert_close(result.scores, torch.tensor([[1.0, 8.0, 85.0**0.5]]))


def test_exact_chunks_give_same_result() -> None:
    gallery = random_vectors(50, 8, seed=4)
    queries = random_vectors(11, 8, seed=5)

    whole = build_backend(gallery, "exact", chunk_size=None).search(queries, 6)
    chunked = build_backend(gallery, "exact", chunk_size=3).search(queries, 6)

    assert torch.equal(whole.indices, chunked.indices)
    torch.testing.assert_close(whole.scores, chunked.scores)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_ties_ordered_by_index(metric: str) -> None:
    # Rows 1, 3, 4 and 6 are the same vector, so they tie for every query.
    gallery = random_vectors(8, 4, seed=6)
    gallery[[3, 4, 6]] = gallery[1]
    backend = build_backend(gallery, "exact", metric)

    top_two = backend.search(gallery[1:2], 2)
    top_four = backend.search(gallery[1:2], 4)

    assert top_two.indices.tolist() == [[1, 3]]
    assert top_four.indices.tolist() == [[1, 3, 4, 6]]


def test_exact_ties_repeat_across_calls() -> None:
    gallery = np.ones((30, 4), dtype=np.float32)
    backend = build_backend(gallery, "exact")

    results = [backend.search(gallery[:3], 7).indices for _ in range(3)]

    assert results[0].tolist() == [list(range(7))] * 3
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("backend_name", ["exact", "faiss"])
def test_k_above_gallery_size_returns_all(backend_name: str) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    gallery = random_vectors(6, 8, seed=7)

    result = build_backend(gallery, backend_name).search(gallery[:2], 50)

    assert result.indices.shape == (2, 6)
    assert sorted(result.indices[0].tolist()) == list(range(6))
    assert bool((result.indices >= 0).all())


@pytest.mark.parametrize("backend_name", ["exact", "faiss"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exclude_drops_query_itself(backend_name: str, metric: str) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    gallery = random_vectors(25, 8, seed=8)
    query_rows = [0, 5, 24]
    backend = build_backend(gallery, backend_name, metric)

    included = backend.search(gallery[query_rows], 4)
    excluded = backend.search(gallery[query_rows], 4, exclude=[[row] for row in query_rows])

    assert included.indices[:, 0].tolist() == query_rows
    for position, row in enumerate(query_rows):
        assert row not in excluded.indices[position].tolist()
    assert torch.equal(excluded.indices[:, :3], included.indices[:, 1:])


@pytest.mark.parametrize("backend_name", ["exact", "faiss"])
def test_exclude_shrinks_k_to_what_remains(backend_name: str) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    gallery = random_vectors(5, 4, seed=9)

    result = build_backend(gallery, backend_name).search(gallery[:2], 10, exclude=[[0], [1, 2]])

    # Query 1 excludes two of five entries, so every query gets 3 results.
    assert result.indices.shape == (2, 3)
    assert set(result.indices[0].tolist()) < {1, 2, 3, 4}
    assert sorted(result.indices[1].tolist()) == [0, 3, 4]


def test_exclude_everything_returns_empty() -> None:
    gallery = random_vectors(3, 4, seed=10)

    result = build_backend(gallery, "exact").search(gallery[:1], 2, exclude=[[0, 1, 2]])

    assert result.indices.shape == (1, 0)
    assert result.scores.shape == (1, 0)


def test_empty_gallery_returns_empty() -> None:
    result = create_backend("exact").search(random_vectors(2, 4, seed=11), 3)

    assert result.indices.shape == (2, 0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_flat_equals_exact(metric: str) -> None:
    pytest.importorskip("faiss")
    gallery = random_vectors(300, 32, seed=12)
    queries = random_vectors(20, 32, seed=13)

    exact = build_backend(gallery, "exact", metric).search(queries, 10)
    flat = build_backend(gallery, "faiss", metric, index_type="flat").search(queries, 10)

    assert torch.equal(flat.indices, exact.indices)
    torch.testing.assert_close(flat.scores, exact.scores, atol=1e-4, rtol=1e-4)
    assert flat.higher_is_better is exact.higher_is_better


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_recall_at_10(index_type: str, metric: str) -> None:
    pytest.importorskip("faiss")
    gallery = clustered_vectors(2000, 32, clusters=40, seed=14)
    query_rows = list(range(0, 2000, 10))
    exclude = [[row] for row in query_rows]

    exact = build_backend(gallery, "exact", metric).search(gallery[query_rows], 10, exclude=exclude)
    approximate = build_backend(gallery, "faiss", metric, index_type=index_type).search(
        gallery[query_rows], 10, exclude=exclude
    )

    assert approximate.indices.shape == (200, 10)
    assert recall_at_k(approximate.indices, exact.indices) >= 0.9


def test_ivf_short_lists_never_return_padding() -> None:
    pytest.importorskip("faiss")
    gallery = random_vectors(100, 16, seed=15)
    # 50 lists of about 2 vectors with 1 probe: faiss finds far fewer than 90 and pads with -1.
    backend = build_backend(gallery, "faiss", index_type="ivf", nlist=50, nprobe=1)

    result = backend.search(gallery[:3], 90)
    exact = build_backend(gallery, "exact").search(gallery[:3], 90)

    assert result.indices.shape == (3, 90)
    assert bool((result.indices >= 0).all())
    assert torch.equal(result.indices, exact.indices)


def test_hnsw_short_results_never_return_padding() -> None:
    pytest.importorskip("faiss")
    gallery = random_vectors(100, 16, seed=16)
    # A graph with 2 links per node can leave vectors unreachable, so even the repeated search may come back short.
    backend = build_backend(gallery, "faiss", index_type="hnsw", hnsw_m=2, ef_search=1)

    result = backend.search(gallery[:3], 100, exclude=[[0], [1], [2]])

    assert result.indices.shape[0] == 3
    assert 0 < result.indices.shape[1] <= 99
    assert bool((result.indices >= 0).all())
    for position, row in enumerate([0, 1, 2]):
        assert row not in result.indices[position].tolist()
        assert len(set(result.indices[position].tolist())) == result.indices.shape[1]


def test_faiss_returned_ties_ordered_by_index() -> None:
    pytest.importorskip("faiss")
    gallery = np.ones((12, 4), dtype=np.float32)

    result = build_backend(gallery, "faiss", index_type="flat").search(gallery[:1], 12)

    assert result.indices.tolist() == [list(range(12))]


def test_add_appends_rows() -> None:
    gallery = random_vectors(20, 8, seed=17)
    backend = create_backend("exact")
    backend.add(gallery[:12])
    backend.add(gallery[12:])

    result = backend.search(gallery[15:16], 1)

    assert len(backend) == 20
    assert result.indices.tolist() == [[15]]


def test_auto_picks_exact_for_small_gallery() -> None:
    backend = build_backend(random_vectors(10, 4, seed=18), "auto")

    assert isinstance(backend, ExactBackend)


def test_auto_picks_faiss_hnsw_above_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(search, "EXACT_MAX_VECTORS", 10)

    backend = build_backend(random_vectors(30, 4, seed=19), "auto")

    assert backend.name == "faiss"
    assert backend.index_type == "hnsw"


def test_auto_stays_exact_for_few_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(search, "EXACT_MAX_VECTORS", 10)
    gallery = random_vectors(30, 4, seed=19)

    few = build_backend(gallery, "auto", expected_queries=search.APPROXIMATE_MIN_QUERIES - 1)
    many = build_backend(gallery, "auto", expected_queries=search.APPROXIMATE_MIN_QUERIES)

    assert isinstance(few, ExactBackend)
    assert many.name == "faiss"


def test_auto_names_options_of_other_backend() -> None:
    with pytest.raises(ValueError, match="'auto' chose 'exact' here.*\\['index_type'\\].*backend=faiss"):
        build_backend(random_vectors(10, 4, seed=32), "auto", index_type="hnsw")


def test_auto_without_faiss_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(search, "EXACT_MAX_VECTORS", 10)
    # A None entry in sys.modules makes `import faiss` raise ImportError.
    monkeypatch.setitem(sys.modules, "faiss", None)

    with caplog.at_level(logging.WARNING, logger="cbir_lightning.retrieval.search"):
        backend = build_backend(random_vectors(30, 4, seed=20), "auto")

    assert isinstance(backend, ExactBackend)
    assert "pip install faiss-cpu" in caplog.text


def test_faiss_missing_error_has_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)

    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        create_backend("faiss")


def test_unknown_backend_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="'annoy'") as error:
        create_backend("annoy")

    assert "exact" in str(error.value)
    assert "faiss" in str(error.value)


def test_unknown_metric_lists_choices() -> None:
    with pytest.raises(ValueError, match="'dot'") as error:
        create_backend("exact", "dot")

    assert "cosine, euclidean" in str(error.value)


def test_create_backend_rejects_auto() -> None:
    with pytest.raises(ValueError, match="build_backend"):
        create_backend("auto")


def test_unknown_faiss_index_type_lists_choices() -> None:
    pytest.importorskip("faiss")

    with pytest.raises(ValueError, match="'pq'.*flat, ivf, hnsw"):
        create_backend("faiss", index_type="pq")


def test_faiss_option_of_other_index_type_rejected() -> None:
    pytest.importorskip("faiss")

    with pytest.raises(ValueError, match="nprobe=4 does not apply to faiss index_type='hnsw'"):
        create_backend("faiss", index_type="hnsw", nprobe=4)


def test_ivf_nlist_above_gallery_size_rejected() -> None:
    pytest.importorskip("faiss")

    with pytest.raises(ValueError, match="nlist=20"):
        build_backend(random_vectors(10, 4, seed=21), "faiss", index_type="ivf", nlist=20)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_invalid_k_rejected(k: object) -> None:
    backend = build_backend(random_vectors(5, 4, seed=22), "exact")

    with pytest.raises(ValueError, match="Invalid k"):
        backend.search(random_vectors(1, 4, seed=23), k)  # type: ignore[arg-type]


def test_query_shape_errors() -> None:
    backend = build_backend(random_vectors(5, 4, seed=24), "exact")

    with pytest.raises(ValueError, match="2-D"):
        backend.search(random_vectors(1, 4, seed=25)[0], 1)
    with pytest.raises(ValueError, match="dimension 3 does not match the gallery dimension 4"):
        backend.search(random_vectors(1, 3, seed=26), 1)


def test_non_finite_vectors_rejected() -> None:
    gallery = random_vectors(5, 4, seed=27)
    gallery[2, 1] = np.nan

    with pytest.raises(ValueError, match="NaN or infinite"):
        build_backend(gallery, "exact")


def test_euclidean_near_duplicate_of_large_vectors() -> None:
    # ReLU-like vectors of norm about 50, as CNN features have, where |q|^2 + |g|^2 - 2 q.g cancels in float32.
    rng = np.random.default_rng(30)
    gallery = np.abs(rng.normal(1.0, 1.0, size=(200, 1280))).astype(np.float32)
    near_copy = gallery[0] + np.float32(1e-4)
    gallery = np.vstack([gallery, near_copy[None]])
    query = gallery[:1]
    true_distance = float(np.linalg.norm(near_copy.astype(np.float64) - gallery[0].astype(np.float64)))

    result = build_backend(gallery, "exact", "euclidean").search(query, 3)

    assert result.indices[0, :2].tolist() == [0, 200]
    assert result.scores[0, 0].item() == 0.0
    assert result.scores[0, 1].item() == pytest.approx(true_distance, rel=1e-3)


def test_euclidean_ties_and_exclusions_beyond_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "EUCLIDEAN_EXTRA_CANDIDATES", 1)
    gallery = np.zeros((8, 3), dtype=np.float32)
    gallery[5:] = 10.0

    result = build_backend(gallery, "exact", "euclidean").search(np.zeros((1, 3)), 4, exclude=[[0, 2]])

    assert result.indices[0].tolist() == [1, 3, 4, 5]
    assert result.scores[0].tolist()[:3] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("exact", {"index_type": "hnsw"}, r"\['index_type'\] for search backend 'exact'.*backend=faiss"),
        ("faiss", {"chunk_size": 4}, r"\['chunk_size'\] for search backend 'faiss'.*backend=exact"),
        ("faiss", {"colour": 1}, r"\['colour'\] for search backend 'faiss', which takes: index_type"),
    ],
)
def test_wrong_backend_options_named(name: str, options: dict[str, object], message: str) -> None:
    pytest.importorskip("faiss")

    with pytest.raises(ValueError, match=message):
        build_backend(random_vectors(5, 4, seed=31), name, **options)


@pytest.mark.parametrize("bad_row", [0, 4, 9])
def test_infinity_found_in_any_block(monkeypatch: pytest.MonkeyPatch, bad_row: int) -> None:
    monkeypatch.setattr(search, "FINITE_CHECK_ROWS", 4)
    gallery = random_vectors(10, 4, seed=27)
    gallery[bad_row, 3] = -np.inf

    with pytest.raises(ValueError, match="NaN or infinite"):
        build_backend(gallery, "exact")


def test_exclude_errors() -> None:
    backend = build_backend(random_vectors(5, 4, seed=28), "exact")
    queries = random_vectors(2, 4, seed=29)

    with pytest.raises(ValueError, match="1 entries for 2 queries"):
        backend.search(queries, 1, exclude=[[0]])
    with pytest.raises(ValueError, match=r"query 1: gallery indices \[5\] are outside 0..4"):
        backend.search(queries, 1, exclude=[[0], [5]])
