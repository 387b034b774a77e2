"""Embedding options of the retrieval evaluation."""

import pytest
import torch

from cbir_lightning.models.heads import MLPHead
from cbir_lightning.retrieval.transforms import expanded_query_scores, head_penultimate, pca_whiten


def test_pca_whiten_gives_unit_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 16, generator=generator) * torch.linspace(0.1, 5.0, 16)

    whitened = pca_whiten(features, dims=8)

    assert whitened.shape == (200, 8)
    torch.testing.assert_close(whitened.var(dim=0), torch.ones(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(whitened.mean(dim=0), torch.zeros(8), atol=1e-4, rtol=0)


def test_pca_whiten_caps_dims_at_rank() -> None:
    assert pca_whiten(torch.randn(5, 32), dims=256).shape == (5, 4)


def test_query_expansion_ignores_self() -> None:
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])

    scores = expanded_query_scores(features, top_n=1)

    # Query 0 expands with image 1 (its nearest other image), never with itself alone.
    expected_query = torch.nn.functional.normalize(
        torch.tensor([1.0, 0.0]) + torch.nn.functional.normalize(features[1], dim=0), dim=0
    )
    unit = torch.nn.functional.normalize(features, dim=1)
    torch.testing.assert_close(scores[0], unit @ expected_query)


def test_head_penultimate_has_last_hidden_width() -> None:
    head = MLPHead(12, 3, hidden=(8, 5))

    embedded = head_penultimate(torch.randn(4, 12), head)

    assert embedded.shape == (4, 5)
    assert bool((embedded >= 0).all())


@pytest.mark.parametrize("top_n", [0, 5])
def test_query_expansion_top_n_bounds(top_n: int) -> None:
    features = torch.eye(5, 4)

    with pytest.raises(ValueError, match=f"query_expansion_top_n={top_n}: it must be between 1 and 4"):
        expanded_query_scores(features, top_n=top_n)
