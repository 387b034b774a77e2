"""Leave-one-out retrieval metrics against a naive reference on small seeded data."""

import numpy as np
import pytest
import torch

from cbir_lightning.evaluation.retrieval_metrics import leave_one_out_metrics, similarity_matrix


def naive_rankings(embeddings: np.ndarray, metric: str) -> list[list[int]]:
    """Rank the other images for each query with plain numpy, best first."""
    rankings = []
    for query in range(len(embeddings)):
        others = [index for index in range(len(embeddings)) if index != query]
        if metric == "cosine":
            unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
            keys = [-float(unit[query] @ unit[index]) for index in others]
        else:
            keys = [float(np.linalg.norm(embeddings[query] - embeddings[index])) for index in others]
        rankings.append([others[position] for position in np.argsort(keys, kind="stable")])
    return rankings


def naive_average_precision(ranking: list[int], relevant: set[int]) -> float:
    hits, total = 0, 0.0
    for position, index in enumerate(ranking, start=1):
        if index in relevant:
            hits += 1
            total += hits / position
    return total / len(relevant)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0])
    centres = torch.randn(3, 6, generator=generator)
    embeddings = centres[labels] + 0.9 * torch.randn(len(labels), 6, generator=generator)
    return embeddings, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_metrics_match_naive_reference(data: tuple[torch.Tensor, torch.Tensor], metric: str) -> None:
    embeddings, labels = data
    rankings = naive_rankings(embeddings.numpy(), metric)
    label_list = labels.tolist()
    relevant = [
        {index for index, label in enumerate(label_list) if label == label_list[query] and index != query}
        for query in range(len(label_list))
    ]
    expected_map = np.mean([naive_average_precision(rankings[q], relevant[q]) for q in range(len(rankings))])
    expected_p3 = np.mean([len(set(rankings[q][:3]) & relevant[q]) / 3 for q in range(len(rankings))])
    expected_r3 = np.mean([len(set(rankings[q][:3]) & relevant[q]) / len(relevant[q]) for q in range(len(rankings))])

    results = leave_one_out_metrics(embeddings, labels, ["a", "b", "c"], metric=metric, cutoffs=(3,))

    assert results["mAP"] == pytest.approx(expected_map, abs=1e-6)
    assert results["P@3"] == pytest.approx(expected_p3, abs=1e-6)
    assert results["R@3"] == pytest.approx(expected_r3, abs=1e-6)


def test_per_class_map_averages_to_query_mean(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    embeddings, labels = data

    results = leave_one_out_metrics(embeddings, labels, ["a", "b", "c"])

    counts = torch.bincount(labels).tolist()
    weighted = sum(results["per_class_mAP"][name] * count for name, count in zip("abc", counts, strict=True))
    assert set(results["per_class_mAP"]) == {"a", "b", "c"}
    assert weighted / len(labels) == pytest.approx(results["mAP"], abs=1e-6)


def test_perfect_clusters_score_one() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])

    results = leave_one_out_metrics(embeddings, labels, ["x", "y"], cutoffs=(1,))

    assert results["mAP"] == pytest.approx(1.0)
    assert results["P@1"] == pytest.approx(1.0)


def test_euclidean_ranks_by_distance() -> None:
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])

    scores = similarity_matrix(embeddings, "euclidean")

    assert scores[0, 1] > scores[0, 2]
    assert scores[0, 1].item() == pytest.approx(-1.0)


def test_invalid_metric_names_choices() -> None:
    with pytest.raises(ValueError, match="Invalid metric 'manhattan'.*cosine, euclidean"):
        similarity_matrix(torch.zeros(2, 2), "manhattan")
