"""The gallery index: building, reopening without recomputation, incremental updates and crash safety."""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbir_lightning.data.decode import UnusableImageError, load_rgb_image
from cbir_lightning.data.transforms import build_preprocessing
from cbir_lightning.features.cache import FeatureKey
from cbir_lightning.models.backbone import FrozenBackbone, build_backbone
from cbir_lightning.models.registry import BackboneSpec
from cbir_lightning.retrieval.embed import Embedder, HashedImage, build_embedder
from cbir_lightning.retrieval.index import MANIFEST_FILE, GalleryIndex, scan_gallery

TESTS_DIR = Path(__file__).resolve().parent


class ForwardCounter:
    """Count the images that pass through a backbone's forward."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.images = 0
        backbone.register_forward_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self.images += len(args[0])


class EmbedderSpy:
    """Pass calls through to an embedder and record the content hashes that each call requests."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.key = embedder.key
        self.requests: list[list[str]] = []

    def embed_records(self, records: Sequence[HashedImage]) -> torch.Tensor:
        self.requests.append([record.sha256 for record in records])
        return self.embedder.embed_records(records)

    @property
    def requested(self) -> list[str]:
        return [digest for request in self.requests for digest in request]


class StubEmbedder:
    """Embed without a backbone: the vector is the first 8 bytes of the content hash.

    ``pause_file``: when set, the first ``embed_records`` call creates that file and then sleeps, so that a
    test can kill the process in the middle of a build.
    """

    key = FeatureKey("stub", "stub-weights", "stub-preprocess", "avg")

    def __init__(self, pause_file: str | None = None) -> None:
        self.pause_file = pause_file

    def embed_records(self, records: Sequence[HashedImage]) -> torch.Tensor:
        if self.pause_file is not None:
            Path(self.pause_file).touch()
            time.sleep(300)
        return torch.stack([stub_vector(record.sha256) for record in records])


def stub_vector(sha256: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(sha256)[:8]), dtype=torch.float32)


def write_image(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row_of(index: GalleryIndex, relpath: str) -> int:
    return index.relpaths.index(relpath)


@pytest.fixture
def embedder(tiny_backbone: BackboneSpec, tmp_path: Path) -> Embedder:
    return build_embedder(tiny_backbone.name, weights_source="none", cache_dir=tmp_path / "cache", show_progress=False)


@pytest.fixture
def built(image_folder: Path, embedder: Embedder, tmp_path: Path) -> GalleryIndex:
    return GalleryIndex.build(image_folder, embedder, tmp_path / "index", show_progress=False)


# ---------------------------------------------------------------------------------------------------------
# Embedder


def test_embedder_rows_are_raw_float32(image_folder: Path, embedder: Embedder) -> None:
    images = scan_gallery(image_folder, show_progress=False).images[:4]

    vectors = embedder.embed_records(images)

    assert vectors.shape == (4, embedder.dim)
    assert vectors.dtype == torch.float32
    assert not torch.allclose(vectors.norm(dim=1), torch.ones(4))


def test_embedder_matches_direct_forward(image_folder: Path, embedder: Embedder) -> None:
    images = scan_gallery(image_folder, show_progress=False).images[:3]
    batch = torch.stack([embedder.preprocessing.transform(load_rgb_image(image.path)) for image in images])

    with torch.inference_mode():
        expected = embedder.backbone(batch)

    torch.testing.assert_close(embedder.embed_records(images), expected)


def test_embedder_uses_training_cache_key(embedder: Embedder) -> None:
    backbone = embedder.backbone

    expected = FeatureKey(backbone.spec.name, backbone.weights_id, embedder.preprocessing.preprocess_id, "avg")

    assert embedder.key == expected


def test_embed_image_reads_cache(image_folder: Path, embedder: Embedder) -> None:
    path = image_folder / "dogs" / "3.jpg"
    first = embedder.embed_image(path)
    counter = ForwardCounter(embedder.backbone)

    second = embedder.embed_image(path)
    images_after_second = counter.images
    from_records = embedder.embed_records(scan_gallery(image_folder, show_progress=False).images)

    assert first.shape == (embedder.dim,)
    assert images_after_second == 0
    assert torch.equal(first, second)
    assert torch.equal(first, from_records[10 + 3])


def test_embed_image_errors(tmp_path: Path, embedder: Embedder) -> None:
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")

    with pytest.raises(FileNotFoundError, match="Query image not found"):
        embedder.embed_image(tmp_path / "missing.jpg")
    with pytest.raises(UnusableImageError, match="not an image"):
        embedder.embed_image(not_image)


def test_embedder_rejects_flatten_pool(tiny_backbone: BackboneSpec, tmp_path: Path) -> None:
    backbone = build_backbone(tiny_backbone.name, source="none", pool="flatten")
    preprocessing = build_preprocessing(backbone.model, "model")

    with pytest.raises(ValueError, match="pool='avg'"):
        Embedder(backbone, preprocessing, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------
# Building and opening


def test_build_stores_rows_and_manifest(image_folder: Path, embedder: Embedder, built: GalleryIndex) -> None:
    scan = scan_gallery(image_folder, show_progress=False)
    manifest = json.loads((built.directory / MANIFEST_FILE).read_text())

    assert len(built) == 30
    assert built.relpaths == [image.relpath for image in scan.images]
    assert [image.sha256 for image in built.images] == [image.sha256 for image in scan.images]
    assert built.class_names == ["cats", "dogs", "owls"]
    assert built.labels == [0] * 10 + [1] * 10 + [2] * 10
    assert built.image_class_names[10] == "dogs"
    assert built.ids.tolist() == list(range(30))
    assert built.paths[0] == image_folder.resolve() / "cats" / "0.jpg"
    torch.testing.assert_close(built.embeddings, embedder.embed_records(scan.images))
    assert manifest["backbone"] == "tiny"
    assert manifest["weights_id"] == embedder.key.weights_id
    assert manifest["preprocess_id"] == embedder.key.preprocess_id
    assert manifest["pool"] == "avg"
    assert manifest["precision"] == "fp32"
    assert manifest["embedding_dim"] == embedder.dim
    assert manifest["count"] == 30
    assert manifest["format_version"] == 1
    assert manifest["created_at"] == manifest["updated_at"]
    assert built.changes is not None
    assert built.changes.added == 30
    assert built.changes.embedded == 30


def test_index_files_have_default_permissions(built: GalleryIndex) -> None:
    umask = os.umask(0)
    os.umask(umask)

    for name in (MANIFEST_FILE, built.manifest.embeddings_file, built.manifest.images_file):
        assert (built.directory / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_open_computes_nothing(built: GalleryIndex, embedder: Embedder) -> None:
    counter = ForwardCounter(embedder.backbone)

    opened = GalleryIndex.open(built.directory)
    checked = GalleryIndex.open(built.directory, embedder)

    assert counter.images == 0
    assert torch.equal(opened.embeddings, built.embeddings)
    assert opened.images == built.images
    assert opened.manifest == built.manifest
    assert opened.changes is None
    assert len(checked) == 30


def test_open_missing_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No gallery index"):
        GalleryIndex.open(tmp_path / "nothing")


def test_open_missing_data_file(built: GalleryIndex) -> None:
    (built.directory / built.manifest.embeddings_file).unlink()

    with pytest.raises(ValueError, match="corrupt.*rebuild=True"):
        GalleryIndex.open(built.directory)


def test_open_newer_format_version(built: GalleryIndex) -> None:
    manifest_path = built.directory / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(ValueError, match="format_version 99"):
        GalleryIndex.open(built.directory)


def test_flat_folder_has_no_classes(tmp_path: Path, embedder: Embedder, caplog: pytest.LogCaptureFixture) -> None:
    flat = tmp_path / "flat"
    for number in range(4):
        write_image(flat / f"photo{number}.jpg", (120, 60 * number, 30), seed=number)
    (flat / "notes.txt").write_text("not an image")

    with caplog.at_level(logging.WARNING, logger="cbir_lightning.retrieval.index"):
        index = GalleryIndex.build(flat, embedder, tmp_path / "index", show_progress=False)

    assert index.manifest.layout == "flat"
    assert index.class_names is None
    assert index.labels == [None] * 4
    assert index.image_class_names == [None] * 4
    assert index.relpaths == [f"photo{number}.jpg" for number in range(4)]
    assert "notes.txt" in caplog.text
    reopened = GalleryIndex.open(index.directory)
    assert reopened.labels == [None] * 4


def test_flat_folder_without_images(tmp_path: Path, embedder: Embedder) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "notes.txt").write_text("not an image")

    with pytest.raises(ValueError, match="no usable image"):
        GalleryIndex.build(flat, embedder, tmp_path / "index", show_progress=False)


def test_search_finds_gallery_image(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    query = embedder.embed_image(image_folder / "owls" / "7.jpg").reshape(1, -1)

    result = built.create_search_backend("exact").search(query, 5)

    assert result.indices[0, 0].item() == row_of(built, "owls/7.jpg")
    assert result.scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Incremental updates


def test_unchanged_update_writes_nothing(built: GalleryIndex, embedder: Embedder) -> None:
    spy = EmbedderSpy(embedder)
    counter = ForwardCounter(embedder.backbone)

    built.update(spy)  # type: ignore[arg-type]

    assert spy.requests == []
    assert counter.images == 0
    assert built.changes is not None
    assert built.changes.unchanged == 30
    assert GalleryIndex.open(built.directory).manifest.version == built.manifest.version


def test_update_embeds_only_added_file(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    new_file = write_image(image_folder / "cats" / "new.jpg", (210, 30, 30), seed=100)
    spy = EmbedderSpy(embedder)
    counter = ForwardCounter(embedder.backbone)
    old_version = built.manifest.version

    built.update(spy)  # type: ignore[arg-type]

    assert spy.requested == [file_sha256(new_file)]
    assert counter.images == 1
    assert len(built) == 31
    assert built.images[row_of(built, "cats/new.jpg")].id == 30
    assert built.changes is not None
    assert built.changes.added == 1
    assert built.changes.reused == 30
    assert built.manifest.version != old_version
    assert built.manifest.created_at == GalleryIndex.open(built.directory).manifest.created_at


def test_removed_file_is_dropped(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    kept_ids = {image.relpath: image.id for image in built.images if image.relpath != "dogs/4.jpg"}
    kept_vector = built.embeddings[row_of(built, "dogs/5.jpg")].clone()
    (image_folder / "dogs" / "4.jpg").unlink()
    spy = EmbedderSpy(embedder)

    built.update(spy)  # type: ignore[arg-type]
    reopened = GalleryIndex.open(built.directory)

    assert spy.requests == []
    assert "dogs/4.jpg" not in reopened.relpaths
    assert len(reopened) == 29
    assert {image.relpath: image.id for image in reopened.images} == kept_ids
    assert torch.equal(reopened.embeddings[row_of(reopened, "dogs/5.jpg")], kept_vector)
    assert built.changes is not None
    assert built.changes.removed == 1


def test_renamed_file_reuses_vector(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    old_vector = built.embeddings[row_of(built, "owls/2.jpg")].clone()
    (image_folder / "owls" / "2.jpg").rename(image_folder / "owls" / "renamed.jpg")
    spy = EmbedderSpy(embedder)
    counter = ForwardCounter(embedder.backbone)

    built.update(spy)  # type: ignore[arg-type]

    assert spy.requests == []
    assert counter.images == 0
    assert "owls/2.jpg" not in built.relpaths
    assert torch.equal(built.embeddings[row_of(built, "owls/renamed.jpg")], old_vector)
    assert built.changes is not None
    assert (built.changes.added, built.changes.removed, built.changes.embedded) == (1, 1, 0)


def test_duplicate_file_reuses_vector(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    shutil.copyfile(image_folder / "cats" / "1.jpg", image_folder / "dogs" / "copy.jpg")
    spy = EmbedderSpy(embedder)
    counter = ForwardCounter(embedder.backbone)

    built.update(spy)  # type: ignore[arg-type]

    assert spy.requests == []
    assert counter.images == 0
    assert len(built) == 31
    original, copy = row_of(built, "cats/1.jpg"), row_of(built, "dogs/copy.jpg")
    assert torch.equal(built.embeddings[copy], built.embeddings[original])
    assert built.image_class_names[copy] == "dogs"


def test_modified_file_is_embedded(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    old_row = row_of(built, "cats/6.jpg")
    old_id = built.images[old_row].id
    old_vector = built.embeddings[old_row].clone()
    modified = write_image(image_folder / "cats" / "6.jpg", (20, 20, 230), seed=200)
    spy = EmbedderSpy(embedder)

    built.update(spy)  # type: ignore[arg-type]
    new_row = row_of(built, "cats/6.jpg")

    assert spy.requested == [file_sha256(modified)]
    assert built.images[new_row].sha256 == file_sha256(modified)
    assert built.images[new_row].id == old_id
    assert not torch.equal(built.embeddings[new_row], old_vector)
    torch.testing.assert_close(built.embeddings[new_row], embedder.embed_image(modified))
    assert built.changes is not None
    assert (built.changes.modified, built.changes.unchanged) == (1, 29)


def test_update_matches_fresh_build(
    built: GalleryIndex, embedder: Embedder, image_folder: Path, tmp_path: Path
) -> None:
    write_image(image_folder / "owls" / "extra.jpg", (30, 30, 220), seed=300)
    (image_folder / "cats" / "0.jpg").unlink()

    updated = GalleryIndex.build(image_folder, embedder, built.directory, show_progress=False)
    fresh = GalleryIndex.build(image_folder, embedder, tmp_path / "fresh", show_progress=False)

    assert updated.relpaths == fresh.relpaths
    torch.testing.assert_close(updated.embeddings, fresh.embeddings)


def test_old_data_files_deleted(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    write_image(image_folder / "dogs" / "extra.jpg", (30, 220, 30), seed=400)

    built.update(embedder)
    names = sorted(path.name for path in built.directory.iterdir())

    assert names == sorted([".lock", MANIFEST_FILE, built.manifest.embeddings_file, built.manifest.images_file])


# ---------------------------------------------------------------------------------------------------------
# Embedding configuration checks


@pytest.fixture
def other_embedder(tiny_backbone: BackboneSpec, tmp_path: Path) -> Embedder:
    return build_embedder(
        tiny_backbone.name, weights_source="none", init_seed=1, cache_dir=tmp_path / "cache", show_progress=False
    )


def test_other_weights_rejected(built: GalleryIndex, other_embedder: Embedder, image_folder: Path) -> None:
    old = built.manifest.weights_id
    new = other_embedder.key.weights_id
    assert old != new

    for action in (
        lambda: GalleryIndex.build(image_folder, other_embedder, built.directory, show_progress=False),
        lambda: GalleryIndex.open(built.directory, other_embedder),
        lambda: built.update(other_embedder),
    ):
        with pytest.raises(ValueError, match="another embedding configuration") as error:
            action()
        assert repr(old) in str(error.value)
        assert repr(new) in str(error.value)
        assert "index.dir=" in str(error.value)
        assert "index.rebuild=true" in str(error.value)
        assert "rebuild=True" in str(error.value)


def test_other_preprocessing_rejected(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    paper = Embedder(embedder.backbone, build_preprocessing(embedder.backbone.model, "paper"), embedder.cache.directory)

    with pytest.raises(ValueError, match="preprocess_id=") as error:
        GalleryIndex.build(image_folder, paper, built.directory, show_progress=False)

    assert "backbone=" not in str(error.value)
    assert GalleryIndex.open(built.directory).manifest.version == built.manifest.version


def test_other_precision_rejected(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    bf16 = Embedder(embedder.backbone, embedder.preprocessing, embedder.cache.directory, precision="bf16")

    with pytest.raises(ValueError, match="precision='fp32' in the index but 'bf16' in the embedder"):
        GalleryIndex.open(built.directory, bf16)
    with pytest.raises(ValueError, match="another embedding configuration"):
        GalleryIndex.build(image_folder, bf16, built.directory, show_progress=False)


def test_manifest_without_precision_reads_as_fp32(built: GalleryIndex, embedder: Embedder) -> None:
    manifest_path = built.directory / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["precision"]
    manifest_path.write_text(json.dumps(manifest))

    reopened = GalleryIndex.open(built.directory, embedder)

    assert reopened.manifest.precision == "fp32"
    assert torch.equal(reopened.embeddings, built.embeddings)


def test_rebuild_replaces_configuration(built: GalleryIndex, other_embedder: Embedder, image_folder: Path) -> None:
    rebuilt = GalleryIndex.build(image_folder, other_embedder, built.directory, rebuild=True, show_progress=False)
    reopened = GalleryIndex.open(built.directory, other_embedder)

    assert reopened.manifest.weights_id == other_embedder.key.weights_id
    assert rebuilt.changes is not None
    assert rebuilt.changes.embedded == 30
    assert not torch.equal(reopened.embeddings, built.embeddings)


# ---------------------------------------------------------------------------------------------------------
# Crash safety


def test_second_writer_rejected(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    with (built.directory / ".lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="Another process is writing"):
            GalleryIndex.build(image_folder, embedder, built.directory, show_progress=False, lock_timeout=1.0)

    assert time.monotonic() - start >= 1.0


def test_build_waits_for_other_writer(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    handle = (built.directory / ".lock").open("a")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    timer = threading.Timer(1.0, handle.close)
    timer.start()

    index = GalleryIndex.build(image_folder, embedder, built.directory, show_progress=False, lock_timeout=30.0)

    timer.join()
    assert index.manifest.version == built.manifest.version


def test_other_root_logs_warning(
    built: GalleryIndex, embedder: Embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = tmp_path / "other"
    shutil.copytree(built.root / "cats", other / "cats")

    with caplog.at_level(logging.WARNING, logger="cbir_lightning.retrieval.index"):
        moved = GalleryIndex.build(other, embedder, built.directory, show_progress=False)

    assert f"was built from {built.root} and now indexes {other}" in caplog.text
    assert len(moved) == 10


BUILD_SCRIPT = """
import os, sys
from pathlib import Path

sys.path.insert(0, {tests_dir!r})
import cbir_lightning.retrieval.index as index_module
from test_retrieval_index import StubEmbedder

root, index_dir, pause_file, pause_at = sys.argv[1:]
if pause_at == "commit":
    # Pause right before the rename that commits the new manifest, after the data files are written.
    real_replace = os.replace

    def pausing_replace(source, target):
        if Path(target).name == "manifest.json":
            Path(pause_file).touch()
            import time
            time.sleep(300)
        real_replace(source, target)

    index_module.os.replace = pausing_replace
    embedder = StubEmbedder()
else:
    embedder = StubEmbedder(pause_file=pause_file)
index_module.GalleryIndex.build(root, embedder, index_dir, show_progress=False)
"""


def kill_build_when_paused(root: Path, index_dir: Path, pause_at: str, tmp_path: Path) -> None:
    """Run a build in a child process, wait until it reaches ``pause_at``, and kill it with SIGKILL."""
    script = tmp_path / "slow_build.py"
    script.write_text(BUILD_SCRIPT.format(tests_dir=str(TESTS_DIR)))
    pause_file = tmp_path / f"paused-{pause_at}"
    command = [sys.executable, str(script), str(root), str(index_dir), str(pause_file), pause_at]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not pause_file.exists():
            if process.poll() is not None:
                pytest.fail(
                    f"The build process exited with {process.returncode} before pausing: {process.stderr.read()}"
                )
            if time.monotonic() > deadline:
                pytest.fail("The build process did not reach the pause point within 120 s.")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.parametrize("pause_at", ["embedding", "commit"])
def test_killed_build_leaves_old_index(pause_at: str, image_folder: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    old = GalleryIndex.build(image_folder, StubEmbedder(), index_dir, show_progress=False)
    write_image(image_folder / "owls" / "new.jpg", (40, 40, 250), seed=500)
    (image_folder / "cats" / "3.jpg").unlink()

    kill_build_when_paused(image_folder, index_dir, pause_at, tmp_path)
    reopened = GalleryIndex.open(index_dir)

    assert reopened.manifest == old.manifest
    assert reopened.images == old.images
    assert torch.equal(reopened.embeddings, old.embeddings)
    assert "cats/3.jpg" in reopened.relpaths
    assert "owls/new.jpg" not in reopened.relpaths


def test_build_keeps_other_files(built: GalleryIndex, embedder: Embedder, image_folder: Path) -> None:
    others = ["images-of-my-cat.jpg", "embeddings-notes.txt", "draft.tmp", "keep.txt"]
    for name in others:
        (built.directory / name).write_text("not the index's")
    write_image(image_folder / "dogs" / "extra.jpg", (30, 220, 30), seed=400)

    updated = GalleryIndex.build(image_folder, embedder, built.directory, show_progress=False)

    assert updated.manifest.version != built.manifest.version
    for name in others:
        assert (built.directory / name).read_text() == "not the index's"


def test_folder_with_other_files_rejected(image_folder: Path, embedder: Embedder, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "images-of-my-cat.jpg").write_bytes(b"a photo")

    with pytest.raises(ValueError, match="contains no gallery index but 1 other entries.*images-of-my-cat.jpg"):
        GalleryIndex.build(image_folder, embedder, folder, show_progress=False)

    assert sorted(path.name for path in folder.iterdir()) == ["images-of-my-cat.jpg"]


def test_foreign_manifest_is_not_an_index(image_folder: Path, embedder: Embedder, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text('{"name": "my web app"}')

    with pytest.raises(ValueError, match="contains no gallery index but 1 other entries.*manifest.json"):
        GalleryIndex.build(image_folder, embedder, folder, rebuild=True, show_progress=False)

    assert (folder / MANIFEST_FILE).read_text() == '{"name": "my web app"}'


def test_old_temporary_manifest_is_cleaned(image_folder: Path, embedder: Embedder, tmp_path: Path) -> None:
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "tmpk3j_9x2a.tmp").write_text("{}")

    index = GalleryIndex.build(image_folder, embedder, folder, show_progress=False)

    assert len(index) == 30
    assert not (folder / "tmpk3j_9x2a.tmp").exists()


@pytest.mark.parametrize("timeout", [-1, None])
def test_invalid_lock_timeout(built: GalleryIndex, embedder: Embedder, image_folder: Path, timeout: object) -> None:
    with pytest.raises(ValueError, match="Invalid lock_timeout"):
        GalleryIndex.build(image_folder, embedder, built.directory, show_progress=False, lock_timeout=timeout)


def test_index_inside_gallery_rejected(image_folder: Path, embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="inside the gallery folder"):
        GalleryIndex.build(image_folder, embedder, image_folder / "index", show_progress=False)
    with pytest.raises(ValueError, match="inside the gallery folder"):
        GalleryIndex.build(image_folder, embedder, image_folder, show_progress=False)

    assert not (image_folder / "index").exists()


def test_hidden_index_inside_gallery(image_folder: Path, embedder: Embedder) -> None:
    first = GalleryIndex.build(image_folder, embedder, image_folder / ".index", show_progress=False)
    second = GalleryIndex.build(image_folder, embedder, image_folder / ".index", show_progress=False)

    assert len(first) == 30
    assert second.manifest.version == first.manifest.version


def test_build_after_kill_removes_leftovers(image_folder: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    GalleryIndex.build(image_folder, StubEmbedder(), index_dir, show_progress=False)
    write_image(image_folder / "owls" / "new.jpg", (40, 40, 250), seed=500)
    kill_build_when_paused(image_folder, index_dir, "commit", tmp_path)
    assert len(list(index_dir.glob("embeddings-*"))) == 2

    index = GalleryIndex.build(image_folder, StubEmbedder(), index_dir, show_progress=False)

    assert "owls/new.jpg" in index.relpaths
    assert len(index) == 31
    names = sorted(path.name for path in index_dir.iterdir())
    assert names == sorted([".lock", MANIFEST_FILE, index.manifest.embeddings_file, index.manifest.images_file])
    torch.testing.assert_close(
        index.embeddings[row_of(index, "owls/new.jpg")], stub_vector(file_sha256(image_folder / "owls" / "new.jpg"))
    )
