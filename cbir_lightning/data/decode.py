"""Decoding of image files of any common mode into upright 8-bit RGB, with a pixel-count guard."""

import logging
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Pillow's default Image.MAX_IMAGE_PIXELS (checked in Pillow 13.0): 1024 * 1024 * 1024 // 4 // 3, the pixel
# count of an image that takes 256 MiB as 8-bit RGB.
DEFAULT_MAX_PIXELS: int = 89_478_485

WHITE = (255, 255, 255, 255)
UINT16_MAX = 65535

# Exceptions that Pillow raises for files it cannot identify or decode. UnidentifiedImageError is a subclass
# of OSError. EOFError, IndexError and struct.error can come from plugins that read past the end of a file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# Modes that carry an alpha channel, premultiplied (La, RGBa) or not.
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_UINT16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}

_pillow_limit_lock = threading.Lock()


class UnusableImageError(ValueError):
    """A file that cannot be used as an image: not an image, truncated or corrupt, or too large."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Unusable image {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type["UnusableImageError"], tuple[Path, str]]:
        # The default pickling passes only the message back to __init__, which needs both arguments.
        return type(self), (self.path, self.reason)


def load_rgb_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file into a fully loaded, upright, 8-bit RGB image.

    The EXIF orientation is applied. Alpha is composited on white, and 16-bit samples are scaled to 8 bits.
    See ``to_rgb`` for the conversion of each mode.

    Args:
        path: Image file.
        max_pixels: Largest accepted width * height, checked from the header before any pixel is decoded.
            ``None`` accepts any size, and Pillow's own ``Image.MAX_IMAGE_PIXELS`` check is switched off.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: the file cannot be opened for reading, for example ``PermissionError``.
        UnusableImageError: the file is empty, not an image, truncated or corrupt, over ``max_pixels``,
            or in a mode with no RGB conversion.
    """
    path = Path(path)
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise UnusableImageError(path, "empty file (0 bytes)")
        try:
            return _decode(file, path, max_pixels)
        except UnidentifiedImageError:
            raise UnusableImageError(path, "not an image (Pillow cannot identify the format)") from None
        except Image.DecompressionBombError as error:
            # Pillow checks some sizes again while decoding, such as GIF frames and TIFF tiles, and these
            # can exceed the size in the header.
            raise UnusableImageError(path, f"too many pixels: {error}") from None
        except UnusableImageError:
            raise
        except _DECODE_ERRORS as error:
            raise UnusableImageError(path, f"truncated or corrupt: {error}") from error


def _decode(file: BinaryIO, path: Path, max_pixels: int | None) -> Image.Image:
    """Open, check the size of, decode and convert one file. Pillow's exceptions pass through."""
    with _pillow_pixel_limit_off() as pillow_limit:
        image = Image.open(file)
    lift_during_load = pillow_limit is not None and (max_pixels is None or max_pixels > pillow_limit)
    with image:
        _check_pixel_count(path, image.size, max_pixels)
        with _pillow_pixel_limit_off() if lift_during_load else nullcontext():
            image.load()
        upright = ImageOps.exif_transpose(image)
        try:
            return to_rgb(upright)
        except ValueError as error:
            raise UnusableImageError(path, f"unsupported image mode {upright.mode}: {error}") from None


@contextmanager
def _pillow_pixel_limit_off() -> Iterator[int | None]:
    """Switch off Pillow's decompression-bomb check, so that only ``max_pixels`` decides, and yield its limit.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that, from inside
    ``Image.open`` and before the caller can look at the size. Without this, an image over our limit
    would first raise Pillow's warning or error, and a ``max_pixels`` above Pillow's limit would be
    overruled by Pillow.

    NOTE: ``Image.MAX_IMAGE_PIXELS`` is a module global. The lock serializes the calls in this module,
    but another thread that opens an image elsewhere at the same moment also runs without Pillow's check.
    """
    with _pillow_limit_lock:
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield saved_limit
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit


def _check_pixel_count(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    pixel_count = width * height
    if max_pixels is not None and pixel_count > max_pixels:
        reason = f"too many pixels: {pixel_count} > {max_pixels} ({width}x{height})"
        raise UnusableImageError(path, reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode into a new 8-bit RGB image.

    - Alpha (LA, La, PA, RGBA, RGBa, or a ``transparency`` entry on P, L and RGB) is composited on white.
    - 16-bit grayscale (I;16*) is scaled with ``round(value * 255 / 65535)``. Mode I (32-bit integer) is
      read the same way, because older Pillow versions open 16-bit grayscale PNG files as I, and values
      outside 0..65535 are clipped first.
    - F (32-bit float) is scaled by 255 when every value lies in [0, 1], else read as 0..255 and clipped.
      NaN becomes 0.
    - Grayscale and 1-bit repeat their channel. CMYK, YCbCr, HSV and LAB use Pillow's ``convert``.

    Pillow itself decodes Adobe inverted CMYK JPEG files, and reduces 16-bit RGB and RGBA PNG files to
    8-bit RGB and RGBA while reading them, so those arrive here as 8-bit modes.

    Raises:
        ValueError: Pillow has no RGB conversion for the mode.
    """
    mode = image.mode
    if mode in _UINT16_MODES or mode == "I":
        return _uint16_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    # NOTE: CMYK becomes RGB with Pillow's plain formula and ignores any embedded ICC profile, so
    # colours of print-oriented CMYK files can be off.
    return image.convert("RGB")


def _uint16_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    values = np.clip(values, 0, UINT16_MAX)
    scaled = np.rint(values * 255.0 / UINT16_MAX).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    scaled = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":
        # Pillow has no direct La -> RGBA conversion, but La -> LA undoes the premultiplication.
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")
