"""Deletion and insertion scores on a synthetic model whose score depends only on one image region."""

import numpy as np
import pytest
import torch
from torch import nn

from cbir_lightning.explain import (
    SimilarityTarget,
    baseline_images,
    class_confidence_fn,
    faithfulness_scores,
    gaussian_maps,
    random_maps,
    similarity_score_fn,
)

SIZE = 32
# The salient region: an 8 x 8 block in the top-left corner, away from the centre that the Gaussian
# baseline favours. It is 1/16 of the image.
REGION = (slice(0, 8), slice(0, 8))


class RegionEnergyModel(nn.Module):
    """Score ``1 - exp(-3 * mean(x**2))`` over the salient region only, in [0, 1)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        region = images[:, :, REGION[0], REGION[1]]
        return 1 - torch.exp(-3 * region.square().mean(dim=(1, 2, 3)))


def textured_images(count: int, seed: int = 0) -> torch.Tensor:
    """Images that are 0 everywhere except for +-1 noise in the salient region."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 3, SIZE, SIZE)
    noise = torch.randint(0, 2, (count, 3, 8, 8), generator=generator).float() * 2 - 1
    images[:, :, REGION[0], REGION[1]] = noise
    return images


def perfect_maps(count: int) -> np.ndarray:
    maps = np.zeros((count, SIZE, SIZE), dtype=np.float32)
    maps[:, REGION[0], REGION[1]] = 1.0
    return maps


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_perfect_map_beats_baselines(baseline: str) -> None:
    model = RegionEnergyModel()
    images = textured_images(3)
    maps = {
        "perfect": perfect_maps(3),
        "random": random_maps(3, SIZE, SIZE, seed=0),
        "gaussian": gaussian_maps(3, SIZE, SIZE),
    }

    scores = {
        name: faithfulness_scores(model, images, map_, steps=16, baseline=baseline) for name, map_ in maps.items()
    }

    for name, result in scores.items():
        for key in ("deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"):
            assert np.all(result[key] >= 0.0), (name, key)
            assert np.all(result[key] <= 1.0), (name, key)
    for name in ("random", "gaussian"):
        assert np.all(scores["perfect"]["deletion_auc"] < scores[name]["deletion_auc"] - 0.1), name
        assert np.all(scores["perfect"]["insertion_auc"] > scores[name]["insertion_auc"] + 0.1), name


def test_curves_run_from_image_to_baseline() -> None:
    model = RegionEnergyModel()
    images = textured_images(2)
    replaced = baseline_images(images, "blur")

    result = faithfulness_scores(model, images, random_maps(2, SIZE, SIZE), steps=4)

    np.testing.assert_allclose(result["fractions"], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert result["deletion_curve"].shape == (2, 5)
    assert result["insertion_curve"].shape == (2, 5)
    np.testing.assert_allclose(result["deletion_curve"][:, 0], model(images).numpy(), atol=1e-6)
    np.testing.assert_allclose(result["deletion_curve"][:, -1], model(replaced).numpy(), atol=1e-6)
    np.testing.assert_allclose(result["insertion_curve"][:, 0], model(replaced).numpy(), atol=1e-6)
    np.testing.assert_allclose(result["insertion_curve"][:, -1], model(images).numpy(), atol=1e-6)


def test_auc_is_trapezoid_area() -> None:
    model = RegionEnergyModel()

    result = faithfulness_scores(model, textured_images(2), perfect_maps(2), steps=8)

    for curve_key, auc_key in (("deletion_curve", "deletion_auc"), ("insertion_curve", "insertion_auc")):
        curves = result[curve_key]
        expected = ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(result["fractions"])).sum(axis=1)
        np.testing.assert_allclose(result[auc_key], expected, atol=1e-7)


def test_batch_matches_single_images() -> None:
    model = RegionEnergyModel()
    images = textured_images(3)
    # Continuous random values have no ties, so the order of pixels does not depend on the seed.
    maps = random_maps(3, SIZE, SIZE, seed=5)

    batched = faithfulness_scores(model, images, maps, steps=8)

    for index in range(3):
        single = faithfulness_scores(model, images[index : index + 1], maps[index : index + 1], steps=8)
        for key in ("deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"):
            np.testing.assert_allclose(single[key][0], batched[key][index], atol=1e-6, err_msg=key)


def test_equal_salience_removed_randomly() -> None:
    # Row-major order would delete the top-left region within the first 1/4 of the pixels.
    model = RegionEnergyModel()
    images = textured_images(1)
    flat_map = np.zeros((1, SIZE, SIZE), dtype=np.float32)

    result = faithfulness_scores(model, images, flat_map, steps=4, baseline="mean")

    assert result["deletion_curve"][0, 1] > 0.5 * result["deletion_curve"][0, 0]


def test_seed_makes_tie_order_reproducible() -> None:
    model = RegionEnergyModel()
    images = textured_images(1)
    flat_map = np.zeros((1, SIZE, SIZE), dtype=np.float32)

    first = faithfulness_scores(model, images, flat_map, steps=4, seed=3)
    second = faithfulness_scores(model, images, flat_map, steps=4, seed=3)

    np.testing.assert_array_equal(first["deletion_curve"], second["deletion_curve"])


def test_input_images_unchanged() -> None:
    images = textured_images(2)
    original = images.clone()

    faithfulness_scores(RegionEnergyModel(), images, perfect_maps(2), steps=4)

    assert torch.equal(images, original)


def test_invalid_arguments_raise() -> None:
    model = RegionEnergyModel()
    images = textured_images(2)
    nan_maps = perfect_maps(2)
    nan_maps[0, 0, 0] = np.nan

    with pytest.raises(ValueError, match="steps=0"):
        faithfulness_scores(model, images, perfect_maps(2), steps=0)
    with pytest.raises(ValueError, match=r"expected \(2, 32, 32\)"):
        faithfulness_scores(model, images, perfect_maps(3))
    with pytest.raises(ValueError, match="NaN"):
        faithfulness_scores(model, images, nan_maps)
    with pytest.raises(ValueError, match="Invalid baseline 'zero'"):
        faithfulness_scores(model, images, perfect_maps(2), baseline="zero")


def test_baseline_images() -> None:
    images = textured_images(2)

    mean = baseline_images(images, "mean")
    blurred = baseline_images(images, "blur")

    assert mean.shape == images.shape
    torch.testing.assert_close(mean[:, :, 5, 7], images.mean(dim=(2, 3)))
    assert blurred.shape == images.shape
    # Blurring keeps the overall level and removes most of the pixel-to-pixel noise energy.
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02, rtol=0)
    assert blurred.square().sum() < 0.5 * images.square().sum()


def test_random_maps_are_seeded() -> None:
    first = random_maps(2, 4, 5, seed=1)

    assert first.shape == (2, 4, 5)
    assert first.dtype == np.float32
    assert ((first >= 0) & (first < 1)).all()
    np.testing.assert_array_equal(first, random_maps(2, 4, 5, seed=1))
    assert not np.array_equal(first, random_maps(2, 4, 5, seed=2))


def test_gaussian_maps_peak_at_centre() -> None:
    maps = gaussian_maps(2, 9, 7)

    assert maps.shape == (2, 9, 7)
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (4, 3)
    assert maps.max() == pytest.approx(1.0)
    assert maps.min() > 0.0
    np.testing.assert_allclose(maps[0], maps[0][::-1, ::-1], atol=1e-7)
    np.testing.assert_array_equal(maps[0], maps[1])
    with pytest.raises(ValueError, match="sigma_fraction"):
        gaussian_maps(1, 4, 4, sigma_fraction=0.0)


def test_class_confidence_is_softmax_probability() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    # nn.Flatten is the classifier here: each 1 x 1 x 3 "image" is its own logits.
    model = nn.Flatten()
    images = logits.reshape(2, 3, 1, 1)

    score = class_confidence_fn(model, [0, 2])(images)

    expected = torch.stack([logits[0].softmax(0)[0], logits[1].softmax(0)[2]])
    torch.testing.assert_close(score, expected)


def test_similarity_score_matches_similarity_target() -> None:
    embeddings = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    references = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    model = nn.Flatten()
    images = embeddings.reshape(3, 6, 1, 1)

    score = similarity_score_fn(model, references)(images)

    for index in range(3):
        expected = SimilarityTarget(references[index])(embeddings[index])
        assert score[index].item() == pytest.approx(expected.item(), abs=1e-6)
