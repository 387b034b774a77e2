"""Keras HDF5 weights for NASNetMobile and Xception, read with h5py and converted to timm models.

Supported architectures: ``nasnetamobile`` (this project's NASNet-A Mobile, Keras ``NASNetMobile``) and
timm's ``legacy_xception`` (Keras ``Xception``). TensorFlow is not needed. Three file layouts are read:

* Legacy weights, written by Keras 2's ``save_weights("x.h5")`` or ``save_format="h5"``: the root attribute
  ``layer_names`` lists the layers, and each layer's group lists its variables in a ``weight_names``
  attribute. Keras' own ``NASNet-mobile.h5`` and ``xception_weights_tf_dim_ordering_tf_kernels.h5``, and
  their no-top files, have this layout.
* Legacy full model, written by ``model.save("x.h5")`` in Keras 2 and 3: the same inside ``model_weights``.
* Keras 3 weights, written by Keras 3's ``save_weights("x.weights.h5")``: ``layers/<class>/vars/<index>``,
  with the layer name in the ``name`` attribute of ``vars``.

Tensors are matched by Keras layer name and variable name. Their layouts change from TensorFlow's to
PyTorch's: Conv2D kernels from HWIO to OIHW, depthwise kernels from (H, W, C, 1) to (C, 1, H, W) and Dense
kernels from (in, out) to (out, in). BatchNorm's gamma, beta, moving_mean and moving_variance become weight,
bias, running_mean and running_var.

Xception needs two changes to timm's ``legacy_xception`` before Keras weights give Keras' outputs, and
:func:`create_model_from_keras_h5` makes them (see :func:`prepare_xception_for_keras`): BatchNorm eps 1e-3
instead of PyTorch's 1e-5, and TensorFlow "SAME" padding for the four stride-2 max pools. timm pads those
pools by one pixel on every side, which shifts the pooling windows whenever the input size is even (at 299 px
in Keras block 3, at 224 px in Keras blocks 4 and 13). NASNet-A Mobile already matches Keras as built.

NOTE: without an ``input_shape``, tf-keras 2.21 builds ``NASNetMobile(include_top=False)`` with 1x1
projections in place of the factorized reductions (4,267,604 parameters instead of 4,269,716). Files saved
from such a model raise :class:`KerasWeightsError` here; Keras 3 gives the no-top model a 224 x 224 input.
"""

import logging
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import timm
import torch
from timm.layers import create_pool2d
from timm.models.xception import SeparableConv2d as XceptionSeparableConv2d
from torch import nn

from cbir_lightning.models.nasnet_mobile import (
    FactorizedReduction,
    NASNetAMobile,
    ReductionCell,
    ReluConvBn,
    SeparableBranch,
)

log = logging.getLogger(__name__)

__all__ = [
    "KERAS_H5_ARCHITECTURES",
    "KerasWeightsError",
    "convert_keras_weights",
    "create_model_from_keras_h5",
    "prepare_xception_for_keras",
    "read_keras_h5",
]

KERAS_H5_ARCHITECTURES = ("nasnetamobile", "legacy_xception")  # the timm architectures with a converter
KERAS_BN_EPS = 1e-3  # the default epsilon of Keras' BatchNormalization, which Xception keeps
KERAS_CLASSIFIER_LAYER = "predictions"  # the Dense layer of both models' top

# A Keras layer's variables by name: {layer name: {variable name: array}}.
KerasWeights = dict[str, dict[str, np.ndarray]]
# For each state dict key of the timm model: (Keras layer, Keras variable, layout conversion).
TensorSource = tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]

# Keras 3's .weights.h5 files store a layer's variables by index, in the order the layer creates them.
KERAS3_VARIABLE_NAMES = {
    "conv2d": ("kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}


class KerasWeightsError(ValueError):
    """A Keras weight file does not match the timm architecture it is loaded into."""


def read_keras_h5(path: Path) -> KerasWeights:
    """Read every layer's variables from a Keras HDF5 file, in any of the three layouts.

    Raises:
        OSError: the file is not an HDF5 file (h5py's error).
        KerasWeightsError: the file is HDF5 but contains no Keras weights.
    """
    with h5py.File(path, "r") as file:
        if _has_attribute(file, "layer_names"):
            return _read_legacy_layers(file)
        if "model_weights" in file and _has_attribute(file["model_weights"], "layer_names"):
            return _read_legacy_layers(file["model_weights"])
        if isinstance(file.get("layers"), h5py.Group):
            return _read_keras3_layers(file["layers"])
    raise KerasWeightsError(
        f"{path} is an HDF5 file without Keras weights: it has no 'layer_names' attribute, "
        "no 'model_weights' group and no 'layers' group."
    )


def _has_attribute(group: h5py.Group, name: str) -> bool:
    # Keras 2 splits attributes over 64 KB into name0, name1, ...
    return name in group.attrs or f"{name}0" in group.attrs


def _string_list_attribute(group: h5py.Group, name: str) -> list[str]:
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in group.attrs:
            chunks.append(group.attrs[f"{name}{len(chunks)}"])
    values = [value for chunk in chunks for value in chunk]
    return [value.decode("utf8") if isinstance(value, bytes) else str(value) for value in values]


def _read_legacy_layers(group: h5py.Group) -> KerasWeights:
    weights = {}
    for layer_name in _string_list_attribute(group, "layer_names"):
        layer_group = group[layer_name]
        variables = {}
        for weight_name in _string_list_attribute(layer_group, "weight_names"):
            # "stem_bn1/gamma:0" (Keras 2) or "stem_bn1/gamma" (Keras 3): the variable is the last part.
            variable = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
            variables[variable] = np.asarray(layer_group[weight_name])
        weights[layer_name] = variables
    return weights


def _read_keras3_layers(layers: h5py.Group) -> KerasWeights:
    weights = {}
    for key, layer_group in layers.items():
        variables_group = layer_group.get("vars")
        if not isinstance(variables_group, h5py.Group) or len(variables_group) == 0:
            continue
        if "name" not in variables_group.attrs:
            raise KerasWeightsError(
                f"Layer group 'layers/{key}' has no 'name' attribute, so its Keras layer name is unknown. "
                "Save the model with model.save('x.h5') instead, which stores every layer name."
            )
        layer_class = re.sub(r"_\d+$", "", key)
        names = KERAS3_VARIABLE_NAMES.get(layer_class, ())
        variables = {}
        for index in range(len(variables_group)):
            variable = names[index] if index < len(names) else str(index)
            variables[variable] = np.asarray(variables_group[str(index)])
        weights[str(variables_group.attrs["name"])] = variables
    return weights


def _conv_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.permute(3, 2, 0, 1)  # HWIO -> OIHW


def _depthwise_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.permute(2, 3, 0, 1)  # (H, W, C, 1) -> (C, 1, H, W)


def _dense_kernel(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.t()  # (in, out) -> (out, in)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _conv(module: str, layer: str) -> dict[str, TensorSource]:
    return {f"{module}.weight": (layer, "kernel", _conv_kernel)}


def _separable(module: str, layer: str, depthwise: str, pointwise: str = "pointwise") -> dict[str, TensorSource]:
    return {
        f"{module}.{depthwise}.weight": (layer, "depthwise_kernel", _depthwise_kernel),
        f"{module}.{pointwise}.weight": (layer, "pointwise_kernel", _conv_kernel),
    }


def _batch_norm(module: str, layer: str) -> dict[str, TensorSource]:
    return {
        f"{module}.weight": (layer, "gamma", _unchanged),
        f"{module}.bias": (layer, "beta", _unchanged),
        f"{module}.running_mean": (layer, "moving_mean", _unchanged),
        f"{module}.running_var": (layer, "moving_variance", _unchanged),
    }


def _dense(module: str, layer: str) -> dict[str, TensorSource]:
    return {f"{module}.weight": (layer, "kernel", _dense_kernel), f"{module}.bias": (layer, "bias", _unchanged)}


def _nasnet_mobile_sources(model: NASNetAMobile) -> dict[str, TensorSource]:
    sources = _conv("stem_conv", "stem_conv1") | _batch_norm("stem_bn", "stem_bn1")
    for block_id, cell in model.cells.items():
        prefix = f"cells.{block_id}"
        kind = "reduction" if isinstance(cell, ReductionCell) else "normal"

        if isinstance(cell.adjust, FactorizedReduction):
            sources |= _conv(f"{prefix}.adjust.conv_1", f"adjust_conv_1_{block_id}")
            sources |= _conv(f"{prefix}.adjust.conv_2", f"adjust_conv_2_{block_id}")
            sources |= _batch_norm(f"{prefix}.adjust.bn", f"adjust_bn_{block_id}")
        elif isinstance(cell.adjust, ReluConvBn):
            sources |= _conv(f"{prefix}.adjust.conv", f"adjust_conv_projection_{block_id}")
            sources |= _batch_norm(f"{prefix}.adjust.bn", f"adjust_bn_{block_id}")

        sources |= _conv(f"{prefix}.conv_1x1.conv", f"{kind}_conv_1_{block_id}")
        sources |= _batch_norm(f"{prefix}.conv_1x1.bn", f"{kind}_bn_1_{block_id}")

        for name, branch in cell.named_children():
            if not isinstance(branch, SeparableBranch):
                continue
            # block<N>_<side> is Keras' <kind>_<side><N>, and the reduction cell's block 5 is named left4.
            block_number, side = re.fullmatch(r"block(\d)_(left|right)", name).groups()
            if kind == "reduction" and name == "block5_left":
                block_number = "4"
            branch_id = f"{kind}_{side}{block_number}_{block_id}"
            sources |= _separable(f"{prefix}.{name}.separable_1", f"separable_conv_1_{branch_id}", "depthwise")
            sources |= _batch_norm(f"{prefix}.{name}.bn_1", f"separable_conv_1_bn_{branch_id}")
            sources |= _separable(f"{prefix}.{name}.separable_2", f"separable_conv_2_{branch_id}", "depthwise")
            sources |= _batch_norm(f"{prefix}.{name}.bn_2", f"separable_conv_2_bn_{branch_id}")
    return sources


def _xception_sources(model: nn.Module, weights: KerasWeights) -> dict[str, TensorSource]:
    # timm's block<N> is Keras' block<N+1>. conv1 and conv2 are Keras' block1, conv3 and conv4 its block14.
    sources = _conv("conv1", "block1_conv1") | _batch_norm("bn1", "block1_conv1_bn")
    sources |= _conv("conv2", "block1_conv2") | _batch_norm("bn2", "block1_conv2_bn")
    if "block1_conv1" not in weights:
        raise _missing_layer_error("block1_conv1", "conv1.weight", weights)
    residual_convs, residual_norms = _xception_residual_layers(weights)
    for index in range(1, 13):
        block = getattr(model, f"block{index}")
        keras_block = f"block{index + 1}"
        separables = [name for name, child in block.rep.named_children() if isinstance(child, XceptionSeparableConv2d)]
        norms = [name for name, child in block.rep.named_children() if isinstance(child, nn.BatchNorm2d)]
        for number, (separable, norm) in enumerate(zip(separables, norms, strict=True), start=1):
            layer = f"{keras_block}_sepconv{number}"
            sources |= _separable(f"block{index}.rep.{separable}", layer, "conv1")
            sources |= _batch_norm(f"block{index}.rep.{norm}", f"{layer}_bn")
        if block.skip is not None:
            channels = block.skip.out_channels
            if channels not in residual_convs or channels not in residual_norms:
                raise KerasWeightsError(
                    f"No residual 1x1 convolution with {channels} output channels and its BatchNorm "
                    f"found for Keras block {keras_block}."
                )
            sources |= _conv(f"block{index}.skip", residual_convs[channels])
            sources |= _batch_norm(f"block{index}.skipbn", residual_norms[channels])
    sources |= _separable("conv3", "block14_sepconv1", "conv1") | _batch_norm("bn3", "block14_sepconv1_bn")
    sources |= _separable("conv4", "block14_sepconv2", "conv1") | _batch_norm("bn4", "block14_sepconv2_bn")
    return sources


def _xception_residual_layers(weights: KerasWeights) -> tuple[dict[int, str], dict[int, str]]:
    """Find Xception's four residual 1x1 convolutions and their BatchNorm layers, keyed by output channels.

    Keras gives them automatic names (conv2d_1 and batch_normalization_1 in the original file, other numbers
    in other Keras versions and sessions), so they are matched by their channel counts: 128, 256, 728 and
    1024, a different count for each block.
    """
    convs, norms = {}, {}
    for name, variables in weights.items():
        if name.startswith("block"):
            continue
        if "kernel" in variables and variables["kernel"].shape[:2] == (1, 1):
            channels, found = variables["kernel"].shape[-1], convs
        elif "moving_mean" in variables:
            channels, found = variables["moving_mean"].shape[0], norms
        else:
            continue
        if channels in found:
            raise KerasWeightsError(
                f"Layers {found[channels]!r} and {name!r} both look like the residual layer "
                f"with {channels} channels, so they cannot be told apart."
            )
        found[channels] = name
    return convs, norms


def convert_keras_weights(weights: KerasWeights, model: nn.Module, timm_arch: str) -> dict[str, torch.Tensor]:
    """Convert Keras weights to a state dict for ``model``, a ``timm_arch`` model.

    The classifier (Keras' ``predictions`` layer) is converted only when the file has it and its shape
    fits ``model``'s classifier. Otherwise the classifier keys are absent from the result.

    Raises:
        KerasWeightsError: a layer or variable is missing, a shape differs, or the file has layers with
            weights that the architecture does not have.
    """
    if timm_arch == "nasnetamobile":
        sources = _nasnet_mobile_sources(model)
    elif timm_arch == "legacy_xception":
        sources = _xception_sources(model, weights)
    else:
        raise KerasWeightsError(
            f"No Keras converter for timm architecture {timm_arch!r}. "
            f"Choose one of: {', '.join(KERAS_H5_ARCHITECTURES)}."
        )

    expected = model.state_dict()
    classifier_name = model.pretrained_cfg.get("classifier", "classifier")
    state_dict = _collect_tensors(weights, sources, expected)
    state_dict |= _classifier_tensors(weights, classifier_name, expected)
    # PyTorch counts BatchNorm updates, but Keras does not store that count.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.zeros_like(value)

    used_layers = {layer for layer, _, _ in sources.values()} | {KERAS_CLASSIFIER_LAYER}
    unused = [name for name, variables in weights.items() if variables and name not in used_layers]
    if unused:
        raise KerasWeightsError(
            f"The Keras file has {len(unused)} layers with weights that {timm_arch} does not have, "
            f"e.g. {', '.join(unused[:5])}, so it was saved from another architecture."
        )
    return state_dict


def _collect_tensors(
    weights: KerasWeights, sources: dict[str, TensorSource], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    state_dict = {}
    for key, (layer, variable, convert) in sources.items():
        if layer not in weights:
            raise _missing_layer_error(layer, key, weights)
        if variable not in weights[layer]:
            raise KerasWeightsError(
                f"Keras layer {layer!r} has no variable {variable!r}, only {', '.join(weights[layer])}."
            )
        tensor = convert(torch.from_numpy(np.array(weights[layer][variable], dtype=np.float32))).contiguous()
        if tensor.shape != expected[key].shape:
            raise KerasWeightsError(
                f"Keras {layer}/{variable} converts to shape {tuple(tensor.shape)}, but {key} has shape "
                f"{tuple(expected[key].shape)}."
            )
        state_dict[key] = tensor
    return state_dict


def _missing_layer_error(layer: str, key: str, weights: KerasWeights) -> KerasWeightsError:
    layers_with_weights = [name for name, variables in weights.items() if variables]
    return KerasWeightsError(
        f"Keras layer {layer!r} (for {key}) is not in the file, whose layers with weights start with "
        f"{', '.join(layers_with_weights[:5]) or 'nothing'}."
    )


def _classifier_tensors(
    weights: KerasWeights, classifier_name: str, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if KERAS_CLASSIFIER_LAYER not in weights:
        return {}
    sources = _dense(classifier_name, KERAS_CLASSIFIER_LAYER)
    if any(key not in expected for key in sources):
        return {}  # the model was built without a classifier
    variables = weights[KERAS_CLASSIFIER_LAYER]
    fits = all(
        variable in variables and convert(torch.from_numpy(variables[variable])).shape == expected[key].shape
        for key, (_, variable, convert) in sources.items()
    )
    if not fits:
        log.info("The Keras classifier does not fit %s, so the classifier keeps its initial weights", classifier_name)
        return {}
    return _collect_tensors(weights, sources, expected)


def prepare_xception_for_keras(model: nn.Module) -> None:
    """Change a timm ``legacy_xception`` model in place so that Keras Xception weights give Keras' outputs.

    Sets every BatchNorm eps to Keras' 1e-3 and replaces the stride-2 3x3 max pools, which timm pads by one
    pixel on each side, with TensorFlow "SAME" pools (timm's ``MaxPool2dSame``, padded with -inf). Neither
    change adds or renames a state dict entry. BatchNorm momentum stays at PyTorch's 0.1 (Keras: 0.99), which
    matters only for training.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = KERAS_BN_EPS
    for index in range(1, 13):
        rep = getattr(model, f"block{index}").rep
        if isinstance(rep[-1], nn.MaxPool2d):
            rep[-1] = create_pool2d("max", 3, stride=2, padding="same")


def create_model_from_keras_h5(timm_arch: str, path: Path, **model_kwargs) -> nn.Module:
    """Build the timm model ``timm_arch`` and load Keras weights from ``path`` into it.

    Every feature-extractor tensor must come from the file. The classifier loads when the file has one
    that fits; a no-top file, or a classifier of another size, leaves it at its random initialisation.

    Raises:
        OSError: ``path`` is not an HDF5 file.
        KerasWeightsError: ``timm_arch`` has no converter, or the file does not match it.
    """
    if timm_arch not in KERAS_H5_ARCHITECTURES:
        raise KerasWeightsError(
            f"No Keras converter for timm architecture {timm_arch!r}. "
            f"Choose one of: {', '.join(KERAS_H5_ARCHITECTURES)}."
        )
    model = timm.create_model(timm_arch, pretrained=False, **model_kwargs)
    if timm_arch == "legacy_xception":
        prepare_xception_for_keras(model)
    state_dict = convert_keras_weights(read_keras_h5(path), model, timm_arch)
    result = model.load_state_dict(state_dict, strict=False)
    classifier_name = model.pretrained_cfg.get("classifier", "classifier")
    missing = [key for key in result.missing_keys if not key.startswith(f"{classifier_name}.")]
    if missing or result.unexpected_keys:  # a bug in the mappings above, not a property of the file
        raise RuntimeError(f"Converted weights leave {missing[:5]} missing and {result.unexpected_keys[:5]} unused.")
    if result.missing_keys:
        log.info("%s has no classifier that fits %s, so the classifier keeps random weights", path, timm_arch)
    return model
