"""Tests for load_rgb_image and to_rgb on small generated files of every mode and failure kind."""

import pickle
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir_lightning.data.decode import DEFAULT_MAX_PIXELS, UnusableImageError, load_rgb_image, to_rgb

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """Build a PNG file by hand, for sample formats that Pillow cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows)) + chunk(b"IEND", b"")


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert abs(got - want) <= tolerance, f"{actual} differs from {expected} by more than {tolerance}"


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    # Orientation 6: the stored pixels must turn 90 degrees clockwise to be upright.
    exif[EXIF_ORIENTATION_TAG] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.size == (32, 64)
    assert_close(image.getpixel((28, 4)), RED, tolerance=8)
    assert_close(image.getpixel((4, 4)), BLUE, tolerance=8)


def test_palette_png(tmp_path: Path) -> None:
    stored = Image.new("P", (2, 1))
    stored.putpalette([*RED, *BLUE])
    stored.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    stored.save(path)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((1, 0)) == BLUE


def test_palette_png_transparency(tmp_path: Path) -> None:
    stored = Image.new("P", (2, 1))
    stored.putpalette([0, 0, 0, *RED])
    stored.putpixel((1, 0), 1)
    path = tmp_path / "palette_transparent.png"
    stored.save(path, transparency=0)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


def test_la_png_on_white(tmp_path: Path) -> None:
    stored = Image.new("LA", (3, 1))
    stored.putpixel((0, 0), (0, 0))
    stored.putpixel((1, 0), (0, 255))
    stored.putpixel((2, 0), (100, 128))
    path = tmp_path / "gray_alpha.png"
    stored.save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 0)
    # 100 * 128/255 + 255 * 127/255 = 177.2
    assert_close(image.getpixel((2, 0)), (177, 177, 177), tolerance=1)


def test_rgba_png_on_white(tmp_path: Path) -> None:
    stored = Image.new("RGBA", (3, 1))
    stored.putpixel((0, 0), (255, 0, 0, 0))
    stored.putpixel((1, 0), (0, 0, 255, 255))
    stored.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "rgba.png"
    stored.save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == BLUE
    # 255 * (1 - 128/255) = 127
    assert_close(image.getpixel((2, 0)), (127, 127, 127), tolerance=1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    stored = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    stored.paste((255, 0, 0, 0), (16, 0, 32, 16))
    path = tmp_path / "cmyk.jpg"
    stored.save(path, quality=95)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert_close(image.getpixel((4, 8)), WHITE, tolerance=4)
    assert_close(image.getpixel((28, 8)), (0, 255, 255), tolerance=4)


def test_one_bit_png(tmp_path: Path) -> None:
    stored = Image.new("1", (2, 1), 0)
    stored.putpixel((1, 0), 1)
    path = tmp_path / "bilevel.png"
    stored.save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == WHITE


def test_uint16_png_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 300, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == (0, 0, 0)
    # Clipping would give 255 here, scaling gives round(300 * 255 / 65535) = 1.
    assert image.getpixel((1, 0)) == (1, 1, 1)
    assert image.getpixel((2, 0)) == (128, 128, 128)
    assert image.getpixel((3, 0)) == WHITE


def test_rgb16_png(tmp_path: Path) -> None:
    # Pillow cannot write 16-bit RGB, so the test builds the file: one row of big-endian samples, filter 0.
    samples = [65535, 0, 0, 0, 32896, 0, 0, 0, 65535]
    raw_row = b"\x00" + struct.pack(">9H", *samples)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(3, 1, bit_depth=16, color_type=2, raw_rows=raw_row))

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((1, 0)) == (0, 128, 0)
    assert image.getpixel((2, 0)) == BLUE


def test_float_tiff_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = tmp_path / "float.tiff"
    Image.fromarray(values, mode="F").save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (128, 128, 128)
    assert image.getpixel((2, 0)) == WHITE


def test_float_tiff_byte_range(tmp_path: Path) -> None:
    values = np.array([[-5.0, 100.0, 300.0, np.nan]], dtype=np.float32)
    path = tmp_path / "float_bytes.tiff"
    Image.fromarray(values, mode="F").save(path)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (100, 100, 100)
    assert image.getpixel((2, 0)) == WHITE
    assert image.getpixel((3, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("La", (1, 1), (0, 0)), WHITE),
        (Image.new("RGBa", (1, 1), (0, 0, 0, 0)), WHITE),
        (Image.new("RGBa", (1, 1), (0, 0, 255, 255)), BLUE),
        (Image.new("PA", (1, 1), (0, 0)), WHITE),
        (Image.new("L", (1, 1), 7), (7, 7, 7)),
        (Image.new("I", (1, 1), 65535), WHITE),
        (Image.new("I", (1, 1), 100_000), WHITE),
        (Image.new("I", (1, 1), -3), (0, 0, 0)),
        (Image.new("I;16B", (1, 1), 32768), (128, 128, 128)),
        (Image.new("I;16L", (1, 1), 32768), (128, 128, 128)),
        (Image.new("RGBX", (1, 1), (1, 2, 3, 0)), (1, 2, 3)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_to_rgb_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    converted = to_rgb(image)

    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == expected


def test_result_outlives_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (2, 2), RED).save(path)

    image = load_rgb_image(path)
    path.unlink()

    assert image.getpixel((1, 1)) == RED


def write_truncated_jpeg(path: Path) -> None:
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    noise.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_text_as_jpeg(path: Path) -> None:
    path.write_text("This is a caption, not a photo.\n")


def write_random_bytes(path: Path) -> None:
    generator = random.Random(0)
    path.write_bytes(bytes(generator.randrange(256) for _ in range(4096)))


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (write_truncated_jpeg, "truncated or corrupt"),
        (write_text_as_jpeg, "not an image"),
        (write_random_bytes, "not an image"),
        (write_empty, "empty file"),
    ],
    ids=["truncated", "text", "random_bytes", "empty"],
)
def test_bad_file_rejected(tmp_path: Path, writer, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    writer(path)

    with pytest.raises(UnusableImageError, match=reason) as caught:
        load_rgb_image(path)

    assert caught.value.path == path
    assert caught.value.reason.startswith(reason)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"

    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_rgb_image(path)


def test_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    Image.new("RGB", (10, 5)).save(path)

    with pytest.raises(UnusableImageError) as caught:
        load_rgb_image(path, max_pixels=49)

    assert caught.value.reason == "too many pixels: 50 > 49 (10x5)"
    assert load_rgb_image(path, max_pixels=50).size == (10, 5)


def test_default_limit_from_header(tmp_path: Path) -> None:
    # The header claims 12000x10000 pixels but the file contains one row, so only a header check can
    # reject it before decoding runs out of data. Pillow's own check would warn for this size.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(12000, 10000, bit_depth=8, color_type=0, raw_rows=b"\x00" * 12001))

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(UnusableImageError) as caught:
            load_rgb_image(path)

    assert caught.value.reason == f"too many pixels: 120000000 > {DEFAULT_MAX_PIXELS} (12000x10000)"


def test_limit_beyond_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # Pillow checks the size of a TIFF again while decoding it, not only when opening it.
    path = tmp_path / "over_pillow_limit.tiff"
    Image.new("RGB", (30, 10), RED).save(path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        unlimited = load_rgb_image(path, max_pixels=None)
        raised_limit = load_rgb_image(path, max_pixels=1000)

    assert unlimited.size == (30, 10)
    assert raised_limit.getpixel((29, 9)) == RED
    assert Image.MAX_IMAGE_PIXELS == 100


def test_limit_below_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "under_pillow_limit.png"
    Image.new("RGB", (30, 10)).save(path)

    with pytest.raises(UnusableImageError, match="too many pixels: 300 > 200"):
        load_rgb_image(path, max_pixels=200)

    assert Image.MAX_IMAGE_PIXELS == 1000


def test_error_pickles() -> None:
    error = UnusableImageError(Path("a/b.jpg"), "not an image")

    restored = pickle.loads(pickle.dumps(error))

    assert restored.path == Path("a/b.jpg")
    assert restored.reason == "not an image"
    assert str(restored) == str(error)
