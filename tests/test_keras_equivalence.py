"""Keras equivalence: converted timm models give Keras' NASNetMobile and Xception outputs.

Each test builds a Keras model with random weights and sets random BatchNorm moving statistics. Keras
starts them at mean 0 and variance 1, which would make BatchNorm almost the identity and the test weak.
The test then saves the model in one of the HDF5 layouts, converts it without TensorFlow and compares
outputs on the same random input, NHWC for Keras and NCHW for PyTorch. Every test records its maximum
absolute difference as the junit property ``max_abs_diff`` (written with
``--junitxml=FILE -o junit_family=legacy``).

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

pytestmark = [
    pytest.mark.tensorflow,
    # Keras 3.15 converts tensors with numpy 2's copy=False in every call, which numpy reports each time.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

MAX_ABS_DIFF = 1e-4
NASNET_SIZE = 224
XCEPTION_SIZE = 299


def randomize_batch_norm(model: object, size: int, seed: int) -> None:
    """Give every Keras BatchNormalization layer random gamma and beta and random moving statistics.

    The moving statistics start as the batch statistics of a training-mode pass on random images (with
    momentum 0), which keeps the activations near unit scale so that the outputs depend on the input, and
    are then perturbed at random.
    """
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        gamma, beta, mean, variance = layer.get_weights()
        gamma = rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32)
        beta = rng.normal(0.0, 0.2, beta.shape).astype(np.float32)
        layer.set_weights([gamma, beta, mean, variance])
        layer.momentum = 0.0

    model(random_images(size, seed=seed + 100), training=True)

    for layer, momentum in zip(norms, momenta, strict=True):
        gamma, beta, mean, variance = layer.get_weights()
        mean = mean + rng.normal(0.0, 0.2, mean.shape).astype(np.float32) * np.sqrt(variance)
        variance = variance * rng.uniform(0.7, 1.4, variance.shape).astype(np.float32)
        layer.set_weights([gamma, beta, mean, variance])
        layer.momentum = momentum


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


def assert_depends_on_input(outputs: np.ndarray) -> None:
    """Check that the two images give clearly different outputs, so that the comparison is not trivial."""
    assert max_abs_diff(outputs[0], outputs[1]) > 100 * MAX_ABS_DIFF


def save_keras(build: Callable[[], object], path: Path, save: str, size: int, seed: int = 1) -> object:
    """Build a Keras model, randomise its BatchNorm layers and save it with ``save`` (``model`` or ``weights``)."""
    keras.utils.set_random_seed(seed)  # seeds Python, NumPy and TensorFlow, so tf-keras initialises the same way
    model = build()
    randomize_batch_norm(model, size, seed)
    if save == "model":
        model.save(path)
    else:
        model.save_weights(path)
    return model


def test_nasnet_mobile_full_model_logits(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "nasnet_mobile.h5"
    build = lambda: keras.applications.NASNetMobile(weights=None, classifier_activation=None)  # noqa: E731
    reference = save_keras(build, path, "model", NASNET_SIZE)
    images = random_images(NASNET_SIZE)

    model = create_model_from_keras_h5("nasnetamobile", path).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert expected.shape == (2, 1000)
    assert_depends_on_input(expected)
    assert diff <= MAX_ABS_DIFF


def test_nasnet_mobile_keras2_no_top_features(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    # Without a static input shape, tf-keras builds a different architecture (1x1 projections in place of
    # the factorized reductions), so the shape is given here, as Keras 3 does by default.
    path = tmp_path / "nasnet_mobile_no_top.h5"
    shape = (NASNET_SIZE, NASNET_SIZE, 3)
    build = lambda: tf_keras.applications.NASNetMobile(  # noqa: E731
        weights=None, include_top=False, pooling="avg", input_shape=shape
    )
    reference = save_keras(build, path, "weights", NASNET_SIZE)
    images = random_images(NASNET_SIZE)

    model = create_model_from_keras_h5("nasnetamobile", path, num_classes=0).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert_depends_on_input(expected)
    assert diff <= MAX_ABS_DIFF


def test_nasnet_mobile_file_source_feature_map(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "nasnet_mobile_no_top.weights.h5"
    build = lambda: keras.applications.NASNetMobile(weights=None, include_top=False)  # noqa: E731
    reference = save_keras(build, path, "weights", NASNET_SIZE)
    images = random_images(NASNET_SIZE)

    backbone = build_backbone("nasnetmobile", source="file", path=str(path))
    captured = {}
    backbone.target_layer().register_forward_hook(lambda module, args, output: captured.update(map=output))
    with torch.no_grad():
        feature_map = backbone.feature_map(torch.from_numpy(images).permute(0, 3, 1, 2))

    expected = keras_output(reference, images)  # (2, 7, 7, 1056), after Keras' final ReLU
    actual = feature_map.permute(0, 2, 3, 1).numpy()
    pooled_diff = max_abs_diff(expected.mean(axis=(1, 2)), actual.mean(axis=(1, 2)))
    map_diff = max_abs_diff(expected, actual)
    record_property("max_abs_diff", pooled_diff)
    record_property("max_abs_diff_map", map_diff)
    assert_depends_on_input(expected)
    assert pooled_diff <= MAX_ABS_DIFF
    # Single map values reach about 50, so float32 rounding alone gives differences near 1e-4 there.
    assert map_diff <= 1e-5 * np.abs(expected).max()
    assert torch.equal(captured["map"], feature_map)
    assert backbone.weights_id == f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


def test_xception_full_model_logits(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception.h5"
    build = lambda: keras.applications.Xception(weights=None, classifier_activation=None)  # noqa: E731
    reference = save_keras(build, path, "model", XCEPTION_SIZE)
    images = random_images(XCEPTION_SIZE)

    model = create_model_from_keras_h5("legacy_xception", path).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert expected.shape == (2, 1000)
    assert_depends_on_input(expected)
    assert diff <= MAX_ABS_DIFF


def test_xception_keras2_no_top_features(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception_notop.h5"
    build = lambda: tf_keras.applications.Xception(weights=None, include_top=False, pooling="avg")  # noqa: E731
    reference = save_keras(build, path, "weights", XCEPTION_SIZE)
    images = random_images(XCEPTION_SIZE)

    model = create_model_from_keras_h5("legacy_xception", path, num_classes=0).eval()

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(model, images))
    record_property("max_abs_diff", diff)
    assert_depends_on_input(expected)
    assert diff <= MAX_ABS_DIFF


def save_xception_224(path: Path, save: str) -> object:
    # At 224 px the max pools of Keras blocks 4 and 13 see even sizes, where "SAME" padding is asymmetric.
    build = lambda: keras.applications.Xception(  # noqa: E731
        weights=None, include_top=False, input_shape=(224, 224, 3), pooling="avg"
    )
    return save_keras(build, path, save, 224)


def test_xception_file_source_at_224(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception_notop.weights.h5"
    reference = save_xception_224(path, "weights")
    images = random_images(224)

    backbone = build_backbone("xception", source="file", path=str(path))

    expected = keras_output(reference, images)
    diff = max_abs_diff(expected, torch_output(backbone, images))
    record_property("max_abs_diff", diff)
    assert_depends_on_input(expected)
    assert diff <= MAX_ABS_DIFF


def test_xception_without_keras_padding_differs(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    path = tmp_path / "xception_notop.h5"
    reference = save_xception_224(path, "model")
    images = random_images(224)
    converted = create_model_from_keras_h5("legacy_xception", path, num_classes=0).eval()
    plain = timm.create_model("legacy_xception", num_classes=0).eval()
    plain.load_state_dict(converted.state_dict())

    expected = keras_output(reference, images)
    plain_diff = max_abs_diff(expected, torch_output(plain, images))
    record_property("max_abs_diff_plain_timm", plain_diff)
    assert max_abs_diff(expected, torch_output(converted, images)) <= MAX_ABS_DIFF
    assert plain_diff > 100 * MAX_ABS_DIFF
