"""Class activation maps: hook cleanup, map shape and range, targets, ViT tokens and the head checkpoint loader."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from cbir_lightning.explain import (
    CAM_METHODS,
    ClassScoreModel,
    ClassTarget,
    EmbeddingModel,
    Explainer,
    SimilarityTarget,
    class_targets,
    load_class_head,
    normalize_maps,
    similarity_targets,
    vit_reshape_transform,
)
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.models.heads import MLPHead
from cbir_lightning.models.registry import BackboneSpec, list_backbones
from cbir_lightning.retrieval.search import ExactBackend
from cbir_lightning.train import train
from tests.conftest import compose_train_config

IMAGE_SIZE = 64
NUM_CLASSES = 3


def random_images(count: int, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hook_count(module: nn.Module) -> int:
    """Count the hooks of every kind on ``module`` and its submodules."""
    return sum(
        len(child._forward_hooks)
        + len(child._forward_pre_hooks)
        + len(child._backward_hooks)
        + len(child._backward_pre_hooks)
        for child in module.modules()
    )


def check_maps(maps: np.ndarray, count: int, size: int) -> None:
    assert maps.shape == (count, size, size)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0
    assert maps.max() <= 1.0


@pytest.fixture
def backbone(tiny_backbone: BackboneSpec) -> FrozenBackbone:
    return build_backbone(tiny_backbone.name, source="none")


@pytest.fixture
def head(tiny_backbone: BackboneSpec) -> MLPHead:
    torch.manual_seed(0)
    return MLPHead(tiny_backbone.num_features, NUM_CLASSES).eval()


class InplaceReluNet(nn.Module):
    """A conv net whose target is an inplace ReLU, followed by an in-place clamp when ``inplace_after``.

    ReLU's backward pass reads its output, so without a copy of the target's output the in-place clamp
    would both change the activations the CAM stored and make autograd fail.
    """

    def __init__(self, inplace_after: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, NUM_CLASSES)
        self.inplace_after = inplace_after
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        activations = self.act(self.conv(images))
        clamped = activations.clamp_(max=0.1) if self.inplace_after else activations.clamp(max=0.1)
        return self.fc(clamped.mean(dim=(2, 3)))


class ConstantMapNet(nn.Module):
    """A conv net without padding: on a constant image, every position of its activation map is equal."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, NUM_CLASSES)
        with torch.no_grad():
            self.conv.bias.fill_(1.0)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(images)).mean(dim=(2, 3)))


def test_unknown_method_lists_choices(backbone: FrozenBackbone, head: MLPHead) -> None:
    with pytest.raises(ValueError, match="Unknown CAM method 'scorecam'") as error:
        Explainer.for_classes(backbone, head, method="scorecam")
    for name in CAM_METHODS:
        assert name in str(error.value)


def test_hooks_removed_after_with_block(backbone: FrozenBackbone, head: MLPHead) -> None:
    target_layer = backbone.target_layer()
    before_target = len(target_layer._forward_hooks) + len(target_layer._backward_hooks)
    before_model = hook_count(backbone)

    with Explainer.for_classes(backbone, head) as explainer:
        assert len(target_layer._forward_hooks) > before_target
        explainer.explain(random_images(2))

    assert len(target_layer._forward_hooks) + len(target_layer._backward_hooks) == before_target
    assert hook_count(backbone) == before_model
    assert hook_count(head) == 0


def explain_then_raise(backbone: FrozenBackbone, head: MLPHead, error_type: type[Exception]) -> None:
    with Explainer.for_classes(backbone, head) as explainer:
        explainer.explain(random_images(1))
        raise error_type("raised inside the block")


@pytest.mark.parametrize("error_type", [RuntimeError, IndexError])
def test_hooks_removed_after_exception(backbone: FrozenBackbone, head: MLPHead, error_type: type[Exception]) -> None:
    # grad-cam's own __exit__ swallows IndexError, so that case checks that the error still propagates.
    target_layer = backbone.target_layer()
    before = len(target_layer._forward_hooks) + len(target_layer._backward_hooks)

    with pytest.raises(error_type, match="raised inside the block"):
        explain_then_raise(backbone, head, error_type)

    assert len(target_layer._forward_hooks) + len(target_layer._backward_hooks) == before
    assert hook_count(backbone) == 0


def test_explain_outside_block_raises(backbone: FrozenBackbone, head: MLPHead) -> None:
    explainer = Explainer.for_classes(backbone, head)
    with pytest.raises(RuntimeError, match="outside its with block"):
        explainer.explain(random_images(1))
    with explainer:
        pass
    with pytest.raises(RuntimeError, match="outside its with block"):
        explainer.explain(random_images(1))


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_maps_shape_and_range(backbone: FrozenBackbone, head: MLPHead, method: str) -> None:
    with Explainer.for_classes(backbone, head, method=method) as explainer:
        maps = explainer.explain(random_images(3), class_targets([0, 1, 2]))

    check_maps(maps, 3, IMAGE_SIZE)
    assert maps.max(axis=(1, 2)).tolist() == [1.0, 1.0, 1.0]


def test_maps_at_non_square_input(backbone: FrozenBackbone, head: MLPHead) -> None:
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with Explainer.for_classes(backbone, head) as explainer:
        maps = explainer.explain(images)

    assert maps.shape == (2, 48, 80)


def test_input_unchanged(backbone: FrozenBackbone, head: MLPHead) -> None:
    images = random_images(2)
    original = images.clone()
    with Explainer.for_classes(backbone, head) as explainer:
        explainer.explain(images)

    assert torch.equal(images, original)
    assert not images.requires_grad
    assert images.grad is None


def test_batches_match_single_pass(backbone: FrozenBackbone, head: MLPHead) -> None:
    images = random_images(5)
    targets = class_targets([2, 1, 0, 2, 1])
    with Explainer.for_classes(backbone, head, batch_size=2) as explainer:
        chunked = explainer.explain(images, targets)
        chunked_outputs = explainer.last_outputs
    with Explainer.for_classes(backbone, head, batch_size=8) as explainer:
        whole = explainer.explain(images, targets)

    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert chunked_outputs is not None
    assert chunked_outputs.shape == (5, NUM_CLASSES)


def test_predicted_class_is_default_target(backbone: FrozenBackbone, head: MLPHead) -> None:
    images = random_images(3)
    with torch.inference_mode():
        predicted = head(backbone(images)).argmax(dim=1).tolist()
    with Explainer.for_classes(backbone, head) as explainer:
        explicit = explainer.explain(images, class_targets(predicted))
        by_none_target = explainer.explain(images, class_targets([None, None, None]))
        by_no_targets = explainer.explain(images)

    np.testing.assert_allclose(by_none_target, explicit, atol=1e-6)
    np.testing.assert_allclose(by_no_targets, explicit, atol=1e-6)


def test_class_target_selects_logit() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.0, 1.0]])

    assert ClassTarget(2)(logits[0]).item() == -1.0
    assert ClassTarget(None)(logits[0]).item() == 2.0
    assert ClassTarget(None)(logits).tolist() == [2.0, 3.0]
    assert ClassTarget(0)(logits).tolist() == [0.5, 3.0]


def test_explain_inside_inference_mode(backbone: FrozenBackbone, head: MLPHead) -> None:
    with torch.inference_mode():
        images = random_images(2)
    with torch.inference_mode(), Explainer.for_classes(backbone, head) as explainer:
        maps = explainer.explain(images)

    check_maps(maps, 2, IMAGE_SIZE)
    assert maps.max() == 1.0


def test_targets_length_must_match_batch(backbone: FrozenBackbone, head: MLPHead) -> None:
    with (
        Explainer.for_classes(backbone, head) as explainer,
        pytest.raises(ValueError, match="Got 1 targets for 2 images"),
    ):
        explainer.explain(random_images(2), class_targets([0]))


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_constant_activations_give_zero_map(method: str) -> None:
    model = ConstantMapNet()
    images = torch.zeros(2, 3, 16, 16)
    with Explainer(model, model.act, method) as explainer:
        maps = explainer.explain(images, class_targets([0, 1]))

    check_maps(maps, 2, 16)
    assert (maps == 0).all()


def test_normalize_maps_edge_cases() -> None:
    ramp = np.arange(12, dtype=np.float32).reshape(3, 4) - 3.0
    maps = np.stack(
        [
            np.full((3, 4), 5.0),  # constant
            -np.arange(1, 13, dtype=np.float64).reshape(3, 4),  # all negative
            np.full((3, 4), np.nan),  # all NaN
            ramp,  # negative values clip to 0, the rest scales to [0, 1]
        ]
    )

    normalized = normalize_maps(maps)

    assert normalized.dtype == np.float32
    assert np.isfinite(normalized).all()
    assert (normalized[:3] == 0).all()
    np.testing.assert_allclose(normalized[3], np.maximum(ramp, 0) / 8.0, atol=1e-7)


def test_normalize_maps_replaces_infinity() -> None:
    maps = np.array([[[1.0, np.inf], [-np.inf, 3.0]]])

    np.testing.assert_allclose(normalize_maps(maps), [[[1 / 3, 0.0], [0.0, 1.0]]], atol=1e-7)


def test_inplace_relu_target_matches_twin() -> None:
    images = random_images(2, size=16)
    maps = {}
    for inplace_after in (False, True):
        model = InplaceReluNet(inplace_after)
        with Explainer(model, model.act) as explainer:
            maps[inplace_after] = explainer.explain(images, class_targets([0, 1]))
        assert hook_count(model) == 0

    check_maps(maps[True], 2, 16)
    assert maps[True].max() == 1.0
    np.testing.assert_allclose(maps[True], maps[False], atol=1e-6)


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_produces_map(name: str) -> None:
    backbone = build_backbone(name, source="none")
    images = random_images(1)
    with torch.inference_mode():
        reference = backbone(random_images(1, seed=1))
    with Explainer.for_similarity(backbone) as explainer:
        maps = explainer.explain(images, similarity_targets(reference))

    check_maps(maps, 1, IMAGE_SIZE)
    assert maps.max() == 1.0
    assert hook_count(backbone) == 0


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam"])
def test_timm_vit_map_with_reshape(method: str) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=IMAGE_SIZE, num_classes=NUM_CLASSES).eval()
    reshape = vit_reshape_transform(vit.num_prefix_tokens, tuple(vit.patch_embed.grid_size))
    with Explainer(vit, vit.blocks[-1].norm1, method, reshape_transform=reshape) as explainer:
        explicit = explainer.explain(random_images(2), class_targets([0, None]))
    with Explainer(vit, vit.blocks[-1].norm1, method) as explainer:
        derived = explainer.explain(random_images(2), class_targets([0, None]))

    check_maps(explicit, 2, IMAGE_SIZE)
    assert explicit.max() == 1.0
    np.testing.assert_allclose(derived, explicit, atol=1e-6)


def test_open_clip_visual_tower_map() -> None:
    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16
    ).eval()
    images = random_images(2, size=32)
    with torch.inference_mode():
        embeddings = visual(images)
    with Explainer(visual, visual.transformer.resblocks[-1].ln_1) as explainer:
        maps = explainer.explain(images, similarity_targets(embeddings.flip(0)))

    check_maps(maps, 2, 32)
    assert maps.max() == 1.0


def test_vit_reshape_transform_drops_prefix_tokens() -> None:
    # Token t of each image has the value t in every channel, so the grid shows which token lands where.
    tokens = torch.arange(2 + 3 * 4, dtype=torch.float32).reshape(1, -1, 1).expand(2, -1, 5)

    grid = vit_reshape_transform(num_prefix_tokens=2, grid_size=(3, 4))(tokens)

    assert grid.shape == (2, 5, 3, 4)
    assert grid[0, 0].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]


def test_vit_reshape_transform_derives_square_grid() -> None:
    tokens = torch.randn(2, 1 + 16, 8)

    grid = vit_reshape_transform()(tokens)

    assert grid.shape == (2, 8, 4, 4)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2, :])


def test_vit_reshape_transform_passes_feature_maps() -> None:
    feature_map = torch.randn(2, 8, 3, 5)

    assert vit_reshape_transform()(feature_map) is feature_map


def test_vit_reshape_transform_rejects_mismatched_grid() -> None:
    with pytest.raises(ValueError, match="Cannot lay out 17 tokens"):
        vit_reshape_transform(num_prefix_tokens=1, grid_size=(3, 4))(torch.randn(1, 17, 8))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vit_reshape_transform(num_prefix_tokens=-1)


def test_similarity_target_matches_search_backend(backbone: FrozenBackbone) -> None:
    images = random_images(5)
    model = EmbeddingModel(backbone)
    with torch.inference_mode():
        embeddings = model(images)
    query, gallery = embeddings[0], embeddings[1:]
    index = ExactBackend("cosine")
    index.add(gallery)
    result = index.search(query.reshape(1, -1), k=4)
    scores, rows = result.scores[0], result.indices[0]

    with Explainer.for_similarity(backbone) as explainer:
        # Explaining the results: the query is the reference of every result image.
        explainer.explain(images[1:][rows], similarity_targets(query.expand(len(rows), -1)))
        result_outputs = explainer.last_outputs
        # Explaining the query: each result in turn is the reference of the query image.
        explainer.explain(images[:1].expand(len(rows), -1, -1, -1), similarity_targets(gallery[rows]))
        query_outputs = explainer.last_outputs

    assert result_outputs is not None
    assert query_outputs is not None
    for position, row in enumerate(rows.tolist()):
        score = scores[position].item()
        assert SimilarityTarget(query)(result_outputs[position]).item() == pytest.approx(score, abs=1e-5)
        assert SimilarityTarget(gallery[row])(query_outputs[position]).item() == pytest.approx(score, abs=1e-5)


def test_similarity_target_accepts_row_vector() -> None:
    reference = torch.tensor([[3.0, 4.0]])

    assert SimilarityTarget(reference)(torch.tensor([6.0, 8.0])).item() == pytest.approx(1.0)
    assert SimilarityTarget(reference)(torch.tensor([[4.0, -3.0], [-3.0, -4.0]])).tolist() == pytest.approx([0, -1])


def test_similarity_target_rejects_invalid_reference() -> None:
    with pytest.raises(ValueError, match=r"expected one \(D,\) vector"):
        SimilarityTarget(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        SimilarityTarget(torch.tensor([1.0, float("nan")]))


def test_embedding_model_rejects_flatten_pool(tiny_backbone: BackboneSpec) -> None:
    backbone = build_backbone(tiny_backbone.name, source="none", pool="flatten")

    with pytest.raises(ValueError, match="pool='avg'"):
        EmbeddingModel(backbone)


def test_class_score_model_uses_backbone_pool(backbone: FrozenBackbone, head: MLPHead) -> None:
    images = random_images(2)
    with torch.inference_mode():
        expected = head(backbone.feature_map(images).mean(dim=(2, 3)))
        logits = ClassScoreModel(backbone, head)(images)

    torch.testing.assert_close(logits, expected)


def train_tiny_head(overrides: list[str], run_dir: Path) -> dict:
    """Train a head on the tiny backbone and return its checkpoint, which the run folder contains as head.pt."""
    train(compose_train_config(overrides))
    return torch.load(run_dir / "head.pt", weights_only=True)


def test_load_class_head_from_run_folder(
    tiny_train_overrides: list[str], tmp_path: Path, backbone: FrozenBackbone
) -> None:
    run_dir = tmp_path / "run"
    checkpoint = train_tiny_head(tiny_train_overrides, run_dir)

    loaded = load_class_head(run_dir, backbone)

    assert loaded.path == run_dir / "head.pt"
    assert loaded.class_names == ["cats", "dogs", "owls"]
    assert loaded.preprocess == checkpoint["preprocess"]
    assert not loaded.head.training
    assert not any(parameter.requires_grad for parameter in loaded.head.parameters())
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    with Explainer.for_classes(backbone, loaded.head) as explainer:
        check_maps(explainer.explain(random_images(2)), 2, IMAGE_SIZE)


def test_load_class_head_rejects_mismatches(
    tiny_train_overrides: list[str], tmp_path: Path, backbone: FrozenBackbone
) -> None:
    checkpoint = train_tiny_head(tiny_train_overrides, tmp_path / "run")
    cases = [
        ("backbone", "mobilenet", "trained with backbone='mobilenet'"),
        ("weights_id", "none:seed=99", "trained with weights_id='none:seed=99'"),
        ("pool", "flatten", "trained with pool='flatten'"),
        ("head", {**checkpoint["head"], "_target_": "os.system"}, "Unsupported head 'os.system'"),
    ]
    for key, value, message in cases:
        path = tmp_path / f"other-{key}.pt"
        torch.save({**checkpoint, key: value}, path)
        with pytest.raises(ValueError, match=message):
            load_class_head(path, backbone)


def test_load_class_head_rejects_foreign_file(backbone: FrozenBackbone, tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "head.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")

    with pytest.raises(ValueError, match="missing head, class_names, backbone, weights_id, pool"):
        load_class_head(tmp_path, backbone)
    with pytest.raises(ValueError, match="torch.load failed"):
        load_class_head(tmp_path / "garbage.pt", backbone)


@pytest.mark.parametrize("given", [None, "missing-run", "missing-run/head.pt"])
def test_load_class_head_missing_checkpoint(backbone: FrozenBackbone, tmp_path: Path, given: str | None) -> None:
    head_checkpoint = None if given is None else tmp_path / given

    with pytest.raises(FileNotFoundError, match="python -m cbir_lightning.train backbone=tiny") as error:
        load_class_head(head_checkpoint, backbone)
    if given is not None:
        assert str(tmp_path / "missing-run") in str(error.value)
