"""Tests for scan_image_folder and write_skipped_csv on small generated folders."""

import csv
import hashlib
import logging
from pathlib import Path

import pytest
from PIL import Image

from cbir_lightning.data.folder import (
    FolderScan,
    SkippedFile,
    natural_sort_key,
    scan_image_folder,
    write_skipped_csv,
)


def write_image(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_truncated(path: Path) -> None:
    write_image(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scan(root: Path, **kwargs) -> FolderScan:
    return scan_image_folder(root, show_progress=False, **kwargs)


@pytest.fixture
def mixed_root(tmp_path: Path) -> Path:
    """Two classes with good files, one file of each bad kind, root-level files and hidden entries."""
    root = tmp_path / "images"
    write_image(root / "cats" / "10.jpg")
    write_image(root / "cats" / "2.png")
    write_image(root / "cats" / "nested" / "1.jpg")
    write_truncated(root / "cats" / "truncated.jpg")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "cats" / "notes.jpg").write_text("not a photo\n")
    write_image(root / "dogs" / "1.jpg")
    write_image(root / "dogs" / "big.png", size=(40, 40))
    (root / "README.md").write_text("# Test images\n")
    (root / "SHA256SUMS").write_text("")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "thumb.jpg")
    (root / "dogs" / ".DS_Store").write_bytes(b"\x00\x01")
    write_truncated(root / "dogs" / ".hidden" / "broken.jpg")
    return root


def test_scan_records(mixed_root: Path) -> None:
    result = scan(mixed_root, max_pixels=1000)

    assert result.root == mixed_root.resolve()
    assert result.class_names == ["cats", "dogs"]
    assert [record.relpath for record in result.records] == [
        "cats/2.png",
        "cats/10.jpg",
        "cats/nested/1.jpg",
        "dogs/1.jpg",
    ]
    assert [record.label for record in result.records] == [0, 0, 0, 1]
    assert [record.class_name for record in result.records] == ["cats", "cats", "cats", "dogs"]


def test_scan_record_fields(mixed_root: Path) -> None:
    result = scan(mixed_root, max_pixels=1000)
    record = result.records[0]

    assert record.path.is_absolute()
    assert record.path == mixed_root.resolve() / "cats" / "2.png"
    assert record.sha256 == hashlib.sha256(record.path.read_bytes()).hexdigest()


def test_scan_skipped(mixed_root: Path) -> None:
    result = scan(mixed_root, max_pixels=1000)
    reasons = {item.path.relative_to(result.root).as_posix(): item.reason for item in result.skipped}

    assert sorted(reasons) == ["cats/empty.jpg", "cats/notes.jpg", "cats/truncated.jpg", "dogs/big.png"]
    assert reasons["cats/empty.jpg"].startswith("empty file")
    assert reasons["cats/notes.jpg"].startswith("not an image")
    assert reasons["cats/truncated.jpg"].startswith("truncated or corrupt")
    assert reasons["dogs/big.png"] == "too many pixels: 1600 > 1000 (40x40)"


def test_scan_warns_per_skip(mixed_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cbir_lightning.data.folder"):
        scan(mixed_root, max_pixels=1000)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]

    assert len(warnings) == 4
    assert any("notes.jpg" in message and "not an image" in message for message in warnings)
    assert not any("README.md" in message or ".DS_Store" in message for message in warnings)


def test_scan_ignores_root_files(mixed_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cbir_lightning.data.folder"):
        result = scan(mixed_root)
    debug_messages = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]

    assert "README.md" not in result.class_names
    assert not any(item.path.name in {"README.md", "SHA256SUMS"} for item in result.skipped)
    assert any("README.md" in message for message in debug_messages)


def test_scan_ignores_hidden(mixed_root: Path) -> None:
    result = scan(mixed_root)
    seen = [record.relpath for record in result.records] + [str(item.path) for item in result.skipped]

    assert ".cache" not in result.class_names
    assert not any(".DS_Store" in entry for entry in seen)
    assert not any(".hidden" in entry for entry in seen)


def test_scan_without_limit(mixed_root: Path) -> None:
    result = scan(mixed_root, max_pixels=None)

    assert "dogs/big.png" in [record.relpath for record in result.records]


def test_label_order(tmp_path: Path) -> None:
    for name in ["mango", "Zebra", "banana", "apple"]:
        write_image(tmp_path / name / "0.png")

    result = scan(tmp_path)

    assert result.class_names == ["Zebra", "apple", "banana", "mango"]
    labels = {record.class_name: record.label for record in result.records}
    assert labels == {"Zebra": 0, "apple": 1, "banana": 2, "mango": 3}


def test_natural_sort_key() -> None:
    names = ["10.jpg", "2.jpg", "1.jpg", "img12.png", "img9.png", "02.jpg"]

    assert sorted(names, key=natural_sort_key) == [
        "1.jpg",
        "02.jpg",
        "2.jpg",
        "10.jpg",
        "img9.png",
        "img12.png",
    ]


def test_write_skipped_csv(tmp_path: Path) -> None:
    skipped = [
        SkippedFile(path=tmp_path / "a" / "x.jpg", reason="not an image"),
        SkippedFile(path=tmp_path / "a" / "y, z.jpg", reason="truncated or corrupt: image file is truncated"),
    ]
    path = tmp_path / "out" / "skipped.csv"

    write_skipped_csv(skipped, path)

    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "reason"]
    assert rows[1] == [str(tmp_path / "a" / "x.jpg"), "not an image"]
    assert rows[2] == [str(tmp_path / "a" / "y, z.jpg"), "truncated or corrupt: image file is truncated"]
    assert len(rows) == 3


def test_write_skipped_csv_empty(tmp_path: Path) -> None:
    path = tmp_path / "skipped.csv"

    write_skipped_csv([], path)

    assert path.read_text().splitlines() == ["path,reason"]


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "absent"

    with pytest.raises(FileNotFoundError, match="absent.*<root>/<class>/<image>"):
        scan(root)


def test_root_is_file(tmp_path: Path) -> None:
    root = tmp_path / "photo.jpg"
    write_image(root)

    with pytest.raises(NotADirectoryError, match="photo.jpg"):
        scan(root)


def test_no_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.jpg")
    (tmp_path / ".git").mkdir()

    with pytest.raises(ValueError, match="no class folder") as caught:
        scan(tmp_path)

    assert str(tmp_path) in str(caught.value)
    assert "<root>/<class>/<image>" in str(caught.value)


def test_class_only_bad_files(tmp_path: Path) -> None:
    write_image(tmp_path / "good" / "1.jpg")
    write_truncated(tmp_path / "bad" / "1.jpg")
    (tmp_path / "bad" / "2.jpg").write_text("text")

    with pytest.raises(ValueError, match="no usable image") as caught:
        scan(tmp_path)

    assert str(tmp_path.resolve() / "bad") in str(caught.value)
    assert "2 files skipped" in str(caught.value)
    assert str(tmp_path.resolve() / "good") not in str(caught.value)


def test_empty_class_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "good" / "1.jpg")
    (tmp_path / "empty").mkdir()

    with pytest.raises(ValueError, match="0 files skipped") as caught:
        scan(tmp_path)

    assert str(tmp_path.resolve() / "empty") in str(caught.value)


def test_scan_progress_bar(mixed_root: Path) -> None:
    result = scan_image_folder(mixed_root, show_progress=True)

    assert len(result.records) == 5
