"""Batched feature extraction with a frozen backbone: image loading, memory format and bfloat16 autocast.

Two options make the CPU forward pass faster:

- ``channels_last``: the weights and every input batch use the NHWC memory format, in which oneDNN's CPU
  convolutions run faster than in plain NCHW (see the "Channels Last" tutorial of Intel Extension for
  PyTorch). The features differ from NCHW only by float rounding, about 1e-5 for MobileNet v1.
- ``precision="bf16"``: the forward pass runs under ``torch.autocast`` with bfloat16, which keeps 8
  significant bits. The features change, so bf16 features need their own cache entries
  (``FeatureKey.precision``).

``python -m experiments.bench_embedding`` measures both against the plain NCHW fp32 loop.

Images are decoded with Pillow and preprocessed in ``num_workers`` DataLoader worker processes. PyTorch
sets each worker to one intra-op thread, so the workers and the backbone's threads share the cores.
Decoding and preprocessing one COREL-1K photo took about 2 ms on one core of the 2-core development
machine (AMD EPYC), a small share of a MobileNet v1 forward pass there, so one or two workers keep the
backbone busy. With ``num_workers=0`` the preprocessing runs in the main process with all of torch's
threads, which was slower there whenever other processes kept a core busy.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cbir_lightning.data.decode import load_rgb_image
from cbir_lightning.data.transforms import Preprocessing
from cbir_lightning.utils.progress import track

__all__ = [
    "PRECISIONS",
    "ImageFileDataset",
    "autocast_context",
    "check_precision",
    "iterate_features",
    "prepare_for_inference",
    "to_model_input",
]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


class ImageFileDataset(Dataset):
    """Image files decoded to upright RGB and preprocessed into ``(C, H, W)`` float tensors, in order."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, max_pixels: int | None) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # NOTE: a file changed on disk since the scan is stored under its old content hash.
        image = load_rgb_image(self.paths[index], self.max_pixels)
        return self.preprocessing.transform(image)


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is ``fp32`` or ``bf16``, else raise ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision {precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
    return precision


def prepare_for_inference(backbone: nn.Module, channels_last: bool) -> nn.Module:
    """Put ``backbone`` in eval mode and its 4-D weights in channels_last or contiguous NCHW format, in place.

    Returns ``backbone``. The memory format changes no result beyond float rounding, so a backbone that
    stays in channels_last afterwards is still correct for NCHW inputs and for training code.
    """
    backbone.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return backbone.to(memory_format=memory_format)


def autocast_context(precision: str, device: torch.device | str) -> AbstractContextManager:
    """Return ``torch.autocast`` with bfloat16 on ``device``'s type for ``bf16``, and a no-op for ``fp32``."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def to_model_input(images: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """Move a ``(N, C, H, W)`` batch to ``device``, in channels_last memory format if ``channels_last``."""
    images = images.to(device)
    if channels_last:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def iterate_features(
    paths: Sequence[Path],
    backbone: nn.Module,
    preprocessing: Preprocessing,
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int | None = None,
    channels_last: bool = True,
    precision: str = "fp32",
    progress_description: str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the features of the images at ``paths`` as float32 CPU batches of up to ``batch_size`` rows, in order.

    The backbone runs under ``torch.inference_mode()`` on the device of its parameters, after
    ``prepare_for_inference(backbone, channels_last)``, and under ``autocast_context(precision, device)``.
    Only as many workers start as there are batches after the first, because a worker that starts for a
    single batch costs more than it saves. ``progress_description`` shows a progress bar with that label.

    Raises:
        ValueError: ``precision`` is not ``fp32`` or ``bf16``.
        UnusableImageError: an image cannot be decoded (with ``num_workers=0``; a worker re-raises it
            wrapped in the DataLoader's own exception type).
    """
    check_precision(precision)
    batch_count = math.ceil(len(paths) / batch_size)
    dataset = ImageFileDataset(paths, preprocessing, max_pixels)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=min(num_workers, max(batch_count - 1, 0)), shuffle=False
    )
    device = next(backbone.parameters()).device
    prepare_for_inference(backbone, channels_last)
    batches = track(loader, progress_description or "", enabled=progress_description is not None)
    for images in batches:
        # The modes are entered per batch, so that the caller's code between batches runs without them.
        with torch.inference_mode(), autocast_context(precision, device):
            features = backbone(to_model_input(images, device, channels_last)).float().cpu()
        yield features
