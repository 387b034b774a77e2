"""Keras equivalence: converted timm models give Keras' NASNetMobile and Xception outputs.

Each test builds a Keras model with random weights, sets random BatchNorm moving statistics (Keras starts
them at mean 0 and variance 1, which would make BatchNorm almost the identity and the test weak), saves it
in one of the HDF5 layouts, converts it without TensorFlow and compares outputs on the same random input,
NHWC for Keras and NCHW for PyTorch. Every test records its maximum absolute difference as the junit
property ``max_abs_diff``.

Needs TensorFlow and tf-keras, which .venv does not have: ``make test-tensorflow`` runs these tests in
.venv-tf. Without TensorFlow the module is skipped.
"""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

# Imported before TensorFlow on purpose: importing torchvision (through timm) after TensorFlow 2.21 crashed
# the interpreter with a segmentation fault in triton's extension module (torch 2.14.1, triton 3.8).
from cbir_lightning.models.backbone import build_backbone
from cbir_lightning.models.weights.keras_h5 import create_model_from_keras_h5

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="needs TensorFlow: run `make test-tensorflow`")
keras = pytest.importorskip("keras", reason="needs Keras 3: run `make test-tensorflow`")
tf_keras = pytest.importorskip("tf_keras", reason="needs tf-keras (Keras 2): run `make test-tensorflow`")

pytestmark = pytest.mark.tensorflow

MAX_ABS_DIFF = 1e-4
NASNET_SIZE = 224
XCEPTION_SIZE = 299


def randomize_batch_norm(model: object, seed: int) -> None:
    """Give every Keras BatchNormalization layer random gamma, beta and moving statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
                rng.normal(0.0, 0.2, mean.shape).astype(np.float32),
                rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
            ]
        )


def random_images(size: int, seed: int = 0) -> np.ndarray:
    """Return two NHWC images in Keras' "tf" input range [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (2, size, size, 3)).astype(np.float32)


def keras_output(model: object, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False))


def torch_output(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    assert expected.shape == actual.shape
    return float(np.abs(expected - actual).max())


def save_keras(build: Callable[[], object], path: Path, save: str, seed: int = 1) -> object:
    """Build a Keras model, randomise its BatchNorm layers and save it with ``save`` (``model`` or ``weights``)."""
    model = build()
    randomize_batch_norm(model, seed)
    if save == "model":
        model.save(path)
    else:
        model.save_weights(path)
    return model


def test_nasnet_mobile_full_model_logits(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "nasnet_mobile.h5"
    reference = save_keras(
        lambda: keras.applications.NASNetMobile(weights=None, classifier_activation=None), path, "model"
    )
    images = random_images(NASNET_SIZE)

    model = create_model_from_keras_h5("nasnetamobile", path).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert expected.shape == (2, 1000)
    assert np.abs(expected).max() > 1.0  # logits of a non-trivial scale
    assert diff <= MAX_ABS_DIFF


def test_nasnet_mobile_keras2_no_top_features(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    # tf-keras builds another architecture without a static input shape, so the shape is given, as
    # Keras 3 does by default and as the original NASNet-mobile-no-top.h5 requires.
    path = tmp_path / "nasnet_mobile_no_top.h5"
    reference = save_keras(
        lambda: tf_keras.applications.NASNetMobile(
            weights=None, include_top=False, pooling="avg", input_shape=(NASNET_SIZE, NASNET_SIZE, 3)
        ),
        path,
        "weights",
    )
    images = random_images(NASNET_SIZE)

    model = create_model_from_keras_h5("nasnetamobile", path, num_classes=0).eval()

    diff = max_abs_diff(keras_output(reference, images), torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert diff <= MAX_ABS_DIFF


def test_nasnet_mobile_file_source_feature_map(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    path = tmp_path / "nasnet_mobile_no_top.weights.h5"
    reference = save_keras(lambda: keras.applications.NASNetMobile(weights=None, include_top=False), path, "weights")
    images = random_images(NASNET_SIZE)

    backbone = build_backbone("nasnetmobile", source="file", path=str(path))
    captured = {}
    backbone.target_layer().register_forward_hook(lambda module, args, output: captured.update(map=output))
    with torch.no_grad():
        feature_map = backbone.feature_map(torch.from_numpy(images).permute(0, 3, 1, 2))

    expected = keras_output(reference, images)  # (2, 7, 7, 1056) after Keras' final ReLU
    actual = feature_map.permute(0, 2, 3, 1).numpy()
    diff = max_abs_diff(expected, actual)
    record_property("max_abs_diff", diff)
    assert diff <= MAX_ABS_DIFF
    assert torch.equal(captured["map"], feature_map)
    assert backbone.weights_id == f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def test_xception_full_model_logits(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception.h5"
    reference = save_keras(lambda: keras.applications.Xception(weights=None, classifier_activation=None), path, "model")
    images = random_images(XCEPTION_SIZE)

    model = create_model_from_keras_h5("legacy_xception", path).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert np.abs(expected).max() > 1.0
    assert diff <= MAX_ABS_DIFF


def test_xception_keras2_no_top_features(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception_notop.h5"
    reference = save_keras(
        lambda: tf_keras.applications.Xception(weights=None, include_top=False, pooling="avg"), path, "weights"
    )
    images = random_images(XCEPTION_SIZE)

    model = create_model_from_keras_h5("legacy_xception", path, num_classes=0).eval()

    diff = max_abs_diff(keras_output(reference, images), torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert diff <= MAX_ABS_DIFF


def test_xception_file_source_at_224(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    # At 224 px the max pools of Keras blocks 4 and 13 see even sizes, where "SAME" padding is asymmetric.
    path = tmp_path / "xception_notop.weights.h5"
    reference = save_keras(
        lambda: keras.applications.Xception(weights=None, include_top=False, input_shape=(224, 224, 3), pooling="avg"),
        path,
        "weights",
    )
    images = random_images(224)

    backbone = build_backbone("xception", source="file", path=str(path))

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(backbone, images))
    record_property("max_abs_diff", diff)
    assert diff <= MAX_ABS_DIFF


def test_xception_without_keras_padding_differs(tmp_path: Path) -> None:
    path = tmp_path / "xception_notop.h5"
    reference = save_keras(
        lambda: keras.applications.Xception(weights=None, include_top=False, input_shape=(224, 224, 3), pooling="avg"),
        path,
        "model",
    )
    images = random_images(224)
    converted = create_model_from_keras_h5("legacy_xception", path, num_classes=0).eval()
    plain = timm.create_model("legacy_xception", num_classes=0).eval()
    plain.load_state_dict(converted.state_dict())

    expected = keras_output(reference, images)
    assert max_abs_diff(expected, torch_output(converted, images)) <= MAX_ABS_DIFF
    assert max_abs_diff(expected, torch_output(plain, images)) > 100 * MAX_ABS_DIFF
