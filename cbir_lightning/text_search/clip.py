"""The ``openclip`` text search backend: CLIP image and text towers from open_clip.

``open_clip.create_model_and_transforms(model, pretrained=...)`` builds the model and its own evaluation
transform, and ``open_clip.get_tokenizer(model)`` its tokenizer. ``pretrained`` is one of open_clip's
tags for the model (downloaded from the Hugging Face hub or a release URL on first use) or a local
checkpoint file. A model architecture that open_clip does not ship can be registered from a JSON
config file (``model_config``).

Gallery images are indexed with the same ``GalleryIndex`` and ``FeatureCache`` machinery as CNN
features. Their key has the backbone ``openclip:<model>`` and a weights id that names the tag or the
checkpoint's SHA-256, so an index rejects vectors of a CNN or of another CLIP model.
"""

import hashlib
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from safetensors import SafetensorError
from torch import nn

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, load_rgb_image
from cbir_lightning.data.folder import ImageRecord
from cbir_lightning.data.transforms import Preprocessing
from cbir_lightning.features.cache import FEATURE_FORMAT_VERSION, FeatureCache, FeatureKey
from cbir_lightning.models.weights.errors import WeightsUnavailableError
from cbir_lightning.models.weights.sources import _offline_unless_reachable
from cbir_lightning.retrieval.embed import HashedImage

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "ClipImageEmbedder",
    "ClipModel",
    "OpenClipSearchSpace",
    "load_clip_model",
    "load_clip_search_space",
    "register_model_config",
]

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
CLIP_POOL = "clip"  # FeatureKey.pool of CLIP image embeddings: the projected image tower output
OFFLINE_ALTERNATIVE = "backend=concepts searches offline with the ImageNet classes of a CNN backbone"
_TEXT_BATCH_SIZE = 256


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer, evaluation transform and the ids of its weights."""

    model: nn.Module
    tokenizer: Any
    preprocessing: Preprocessing
    model_name: str
    pretrained: str
    weights_id: str
    """``tag:<open_clip tag>`` or ``file:<first 16 hex digits of the checkpoint's SHA-256>``."""

    @property
    def context_length(self) -> int:
        """Maximum number of text tokens, start and end tokens included."""
        return int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def feature_key(self) -> FeatureKey:
        """Return the cache and index key of this model's image embeddings."""
        return FeatureKey(
            backbone=f"openclip:{self.model_name}",
            weights_id=self.weights_id,
            preprocess_id=self.preprocessing.preprocess_id,
            pool=CLIP_POOL,
            code_version=f"{FEATURE_FORMAT_VERSION}:open_clip-{open_clip.__version__}",
        )


def register_model_config(path: Path | str) -> str:
    """Register an open_clip model config JSON file and return its model name, the file name's stem.

    The file has open_clip's layout: ``embed_dim``, ``vision_cfg`` and ``text_cfg``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not such a config.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {str(path)!r} not found.")
    open_clip.add_model_config(path)
    if path.stem not in open_clip.list_models():
        raise ValueError(
            f"open_clip did not register {path}: a model config needs the keys embed_dim, vision_cfg and text_cfg."
        )
    return path.stem


def load_clip_model(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    model_config: Path | str | None = None,
    device: str | torch.device = "cpu",
) -> ClipModel:
    """Create an open_clip model with weights from a tag or a checkpoint file, its transform and tokenizer.

    ``model_config`` registers a JSON model config first (see ``register_model_config``). When a tag's
    download host is not reachable, the Hugging Face client runs offline and only a cached download can
    be used, so an offline machine fails within seconds.

    Raises:
        ValueError: unknown model name, or ``pretrained`` is empty.
        WeightsUnavailableError: the weights cannot be obtained or loaded; the message names
            ``backend=concepts`` as the offline alternative.
    """
    if model_config is not None:
        register_model_config(model_config)
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip model {model_name!r}. Choose one of open_clip.list_models(), e.g. "
            f"{DEFAULT_CLIP_MODEL}, or register a JSON config with clip.model_config=<file>."
        )
    pretrained = str(pretrained or "").strip()
    if not pretrained:
        raise ValueError(
            "clip.pretrained is empty: pass an open_clip tag such as "
            f"{DEFAULT_CLIP_PRETRAINED!r} or a checkpoint file. Random CLIP weights are not supported."
        )

    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        model, transform = _create_from_tag(model_name, pretrained, tag_cfg, device)
        weights_id = f"tag:{pretrained}"
    else:
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.is_file():
            tags = ", ".join(list_pretrained_tags_by_model(model_name)) or "none"
            raise WeightsUnavailableError(
                f"No CLIP weights for {model_name!r}: clip.pretrained={pretrained!r} is neither an open_clip "
                f"tag of this model (tags: {tags}) nor an existing checkpoint file. "
                f"Alternative: {OFFLINE_ALTERNATIVE}."
            )
        model, transform = _create_from_file(model_name, checkpoint, device)
        weights_id = f"file:{_file_digest(checkpoint)}"

    tokenizer = _create_tokenizer(model_name)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    preprocessing = Preprocessing(transform, _preprocess_id(preprocess_cfg), _input_size(preprocess_cfg, model))
    log.info("CLIP model %s with weights %s, preprocessing %s", model_name, weights_id, preprocess_cfg)
    return ClipModel(model.eval(), tokenizer, preprocessing, model_name, pretrained, weights_id)


def _create_from_tag(model_name: str, tag: str, tag_cfg: dict, device: str | torch.device) -> tuple[nn.Module, Any]:
    url = _download_url(tag_cfg)
    with _offline_unless_reachable(url) as online:
        try:
            model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=tag, device=device)
        except RuntimeError as error:  # open_clip wraps every download failure in RuntimeError
            reason = f"the download from {url} failed ({error})"
            if not online:
                reason = f"{url} is not reachable and no cached download was found"
            raise WeightsUnavailableError(
                f"No CLIP weights for {model_name!r} with clip.pretrained={tag}: {reason}. "
                f"Alternatives: clip.pretrained=/path/to/checkpoint for a local file, or {OFFLINE_ALTERNATIVE}."
            ) from error
    return model, transform


def _create_from_file(model_name: str, checkpoint: Path, device: str | torch.device) -> tuple[nn.Module, Any]:
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            model_name, pretrained=str(checkpoint), device=device
        )
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        raise WeightsUnavailableError(
            f"Cannot load CLIP checkpoint {checkpoint} into {model_name!r} ({type(error).__name__}: {error}). "
            f"Check that the file belongs to this model, or use {OFFLINE_ALTERNATIVE}."
        ) from error
    return model, transform


def _create_tokenizer(model_name: str) -> Any:
    hf_tokenizer = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if not hf_tokenizer:
        return open_clip.get_tokenizer(model_name)
    # Tokenizers of Hugging Face text towers come from the hub or its local cache.
    url = f"https://huggingface.co/{hf_tokenizer}"
    with _offline_unless_reachable(url):
        try:
            return open_clip.get_tokenizer(model_name)
        except OSError as error:  # transformers raises OSError for files it can neither find nor download
            raise WeightsUnavailableError(
                f"Cannot load the tokenizer {hf_tokenizer!r} of {model_name!r} from {url} or its cache ({error}). "
                f"Alternative: {OFFLINE_ALTERNATIVE}."
            ) from error


def _download_url(tag_cfg: dict) -> str:
    hub = tag_cfg.get("hf_hub") or ""
    if hub:
        return "https://huggingface.co/" + "/".join(hub.strip("/").split("/")[:2])
    return tag_cfg.get("url") or "https://huggingface.co"


def _file_digest(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()[:16]


def _preprocess_id(preprocess_cfg: dict) -> str:
    """Describe the transform by open_clip's preprocessing config, so that a change gives a new cache key."""
    parts = []
    for name in sorted(preprocess_cfg):
        value = preprocess_cfg[name]
        if isinstance(value, list | tuple):
            value = ",".join(f"{item:.6g}" if isinstance(item, float) else str(item) for item in value)
        parts.append(f"{name}={value}")
    return "openclip:" + ":".join(parts)


def _input_size(preprocess_cfg: dict, model: nn.Module) -> tuple[int, int, int]:
    size = preprocess_cfg.get("size") or getattr(model.visual, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (3, int(height), int(width))


class _ImageTower(nn.Module):
    """The CLIP image encoder as a module that maps preprocessed images to raw image embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images).float()


class ClipImageEmbedder:
    """The embedder that ``GalleryIndex`` uses for CLIP image embeddings instead of CNN features.

    It has the interface of ``cbir_lightning.retrieval.embed.Embedder`` (``key``, ``dim``,
    ``embed_records``, ``embed_image``). The vectors are raw: the projected image tower output, not
    L2-normalised. They are cached in the ``FeatureCache`` under ``ClipModel.feature_key()``.
    """

    def __init__(
        self,
        clip: ClipModel,
        cache_dir: Path | str,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        show_progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size={batch_size}: it must be at least 1.")
        self.clip = clip
        self.tower = _ImageTower(clip.model).eval()
        self.key = clip.feature_key()
        self.cache = FeatureCache(cache_dir, self.key)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_pixels = max_pixels
        self.show_progress = show_progress
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``, found with one forward pass of a blank image on first use."""
        if self._dim is None:
            blank = torch.zeros(1, *self.clip.preprocessing.input_size, device=self.clip.device)
            with torch.inference_mode():
                self._dim = int(self.tower(blank).shape[1])
        return self._dim

    def embed_records(self, records: Sequence[HashedImage]) -> torch.Tensor:
        """Return the ``(len(records), D)`` float32 raw image embeddings of ``records``, in order.

        Contents missing from the feature cache go through the image tower in batches.
        """
        if not records:
            return torch.empty(0, self.dim, dtype=torch.float32)
        features = self.cache.extract(
            records,  # type: ignore[arg-type]  # extract reads only .path and .sha256
            self.tower,
            self.clip.preprocessing,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_pixels=self.max_pixels,
            show_progress=self.show_progress,
        )
        return features.float()

    def embed_image(self, path: Path | str) -> torch.Tensor:
        """Return the ``(D,)`` raw embedding of one image file, cached under the SHA-256 of its bytes.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            UnusableImageError: the file cannot be decoded as an image.
        """
        path = Path(path).expanduser().resolve()
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise FileNotFoundError(f"Query image not found: {path}") from None
        if not self.cache.entry_path(digest).exists():
            # Decoding here raises UnusableImageError itself, where a loader worker would wrap it.
            load_rgb_image(path, self.max_pixels)
        record = ImageRecord(path=path, relpath=path.name, class_name="", label=-1, sha256=digest)
        return self.embed_records([record])[0]


class OpenClipSearchSpace:
    """Zero-shot search in CLIP's joint space: the score is the cosine similarity of image and query."""

    backend = "openclip"
    score_name = "cosine similarity"

    def __init__(self, clip: ClipModel, embedder: ClipImageEmbedder) -> None:
        self.clip = clip
        self.embedder = embedder

    def describe(self) -> dict[str, Any]:
        """Return the backend's configuration for reports."""
        return {
            "backend": self.backend,
            "model": self.clip.model_name,
            "pretrained": self.clip.pretrained,
            "weights_id": self.clip.weights_id,
            "context_length": self.clip.context_length,
        }

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return ``(len(texts), D)`` unit-length text embeddings.

        A text longer than the context length is truncated by the tokenizer, and a warning names it.
        """
        texts = [str(text) for text in texts]
        for text in texts:
            self._warn_if_truncated(text)
        rows = []
        for start in range(0, len(texts), _TEXT_BATCH_SIZE):
            tokens = self.clip.tokenizer(texts[start : start + _TEXT_BATCH_SIZE]).to(self.clip.device)
            with torch.inference_mode():
                rows.append(self.clip.model.encode_text(tokens).float().cpu())
        return F.normalize(torch.cat(rows), dim=1) if rows else torch.empty(0, 0)

    def _warn_if_truncated(self, text: str) -> None:
        count = _token_count(self.clip.tokenizer, text)
        if count is not None and count > self.clip.context_length:
            log.warning(
                "Query text is %d tokens long, but %s reads at most %d (start and end tokens included), so "
                "it was truncated and only its beginning is searched: %r",
                count,
                self.clip.model_name,
                self.clip.context_length,
                text,
            )

    def encode_image_file(self, path: Path) -> torch.Tensor:
        """Return the unit-length CLIP embedding of one image file, cached by content."""
        return F.normalize(self.embedder.embed_image(path), dim=0)

    def gallery_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the L2-normalised rows of the raw gallery embeddings."""
        return F.normalize(embeddings.float(), dim=1)

    def score(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Return the cosine similarity of every gallery row with the unit-length ``query``."""
        return gallery @ query.float()

    def result_details(self, embeddings: torch.Tensor) -> list[dict[str, Any]]:
        """Return no extra details: CLIP vectors carry no class names."""
        return [{} for _ in range(len(embeddings))]


def _token_count(tokenizer: Any, text: str) -> int | None:
    """Return the number of tokens of ``text``, start and end tokens included, or None if unknown."""
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)
    if callable(inner):
        return len(inner(text)["input_ids"])
    return None


def load_clip_search_space(
    model_name: str,
    pretrained: str,
    cache_dir: Path | str,
    model_config: Path | str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> OpenClipSearchSpace:
    """Load a CLIP model and wrap it with its image embedder as a search space.

    Raises what ``load_clip_model`` raises.
    """
    clip = load_clip_model(model_name, pretrained, model_config, device)
    embedder = ClipImageEmbedder(clip, cache_dir, batch_size, num_workers, max_pixels, show_progress)
    return OpenClipSearchSpace(clip, embedder)
