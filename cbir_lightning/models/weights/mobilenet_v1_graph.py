"""Converter from the TF-Slim MobileNet v1 1.0/224 frozen GraphDef to a timm ``mobilenetv1_100`` state dict.

The graph is parsed with the GraphDef protobuf classes that the ``tensorboard`` package ships, so TensorFlow
is not needed. The target model must be created with ``pad_type="same"``, BatchNorm eps 1e-3 and
1001 classes (index 0 is the TF-Slim "background" class), because the graph uses TF "SAME" padding,
eps 1e-3 and ReLU6.
"""

from math import prod
from pathlib import Path

import numpy as np
import torch
from tensorboard.compat.proto.graph_pb2 import GraphDef
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT
from torch import nn

SLIM_SCOPE = "MobilenetV1"
NUM_SEPARABLE_LAYERS = 13
LOGITS_SCOPE = f"{SLIM_SCOPE}/Logits/Conv2d_1c_1x1"

# TF-Slim BatchNorm variable name -> torch BatchNorm2d state dict name.
_BATCH_NORM_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def convert_mobilenet_v1_graph(graph_path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert the graph's weights into a state dict that loads strictly into ``model``."""
    constants = read_float_constants(graph_path)
    return mobilenet_v1_state_dict(constants, separable_block_prefixes(model))


def read_float_constants(graph_path: Path) -> dict[str, np.ndarray]:
    """Parse a frozen GraphDef file and return every float32 Const node as an array, keyed by node name."""
    graph = GraphDef()
    graph.ParseFromString(graph_path.read_bytes())

    constants = {}
    for node in graph.node:
        tensor = node.attr["value"].tensor
        if node.op == "Const" and tensor.dtype == DT_FLOAT:
            constants[node.name] = decode_float_tensor(tensor, node.name)
    return constants


def decode_float_tensor(tensor: TensorProto, name: str = "") -> np.ndarray:
    """Decode a DT_FLOAT TensorProto into a writable float32 array of its shape."""
    shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        # TensorFlow stores tensor_content as little-endian raw bytes.
        values = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        values = np.asarray(tensor.float_val, dtype=np.float32)

    size = prod(shape)
    if values.size == size:
        return values.astype(np.float32).reshape(shape)
    if values.size == 1:
        # TensorFlow stores a tensor filled with one value as that single value.
        return np.full(shape, values[0], dtype=np.float32)
    raise ValueError(f"Const node {name!r} has {values.size} values but its shape {shape} needs {size}.")


def separable_block_prefixes(model: nn.Module) -> list[str]:
    """Return the state dict prefixes of the depthwise-separable blocks of a timm MobileNet v1, in order."""
    return [
        f"blocks.{stage_index}.{block_index}"
        for stage_index, stage in enumerate(model.blocks)
        for block_index in range(len(stage))
    ]


def mobilenet_v1_state_dict(constants: dict[str, np.ndarray], block_prefixes: list[str]) -> dict[str, torch.Tensor]:
    """Map TF-Slim MobileNet v1 constants onto timm ``mobilenetv1_100`` state dict names.

    ``block_prefixes`` lists the timm prefix of each of the 13 depthwise-separable layers
    (``Conv2d_1`` to ``Conv2d_13`` in TF-Slim).
    """
    if len(block_prefixes) != NUM_SEPARABLE_LAYERS:
        raise ValueError(
            f"The timm model has {len(block_prefixes)} depthwise-separable blocks, "
            f"but MobileNet v1 has {NUM_SEPARABLE_LAYERS}. Create it as 'mobilenetv1_100'."
        )

    state_dict = _convolution(constants, "Conv2d_0", "conv_stem", "bn1")
    for layer_index, prefix in enumerate(block_prefixes, start=1):
        state_dict |= _depthwise_convolution(
            constants, f"Conv2d_{layer_index}_depthwise", f"{prefix}.conv_dw", f"{prefix}.bn1"
        )
        state_dict |= _convolution(constants, f"Conv2d_{layer_index}_pointwise", f"{prefix}.conv_pw", f"{prefix}.bn2")
    return state_dict | _classifier(constants)


def _constant(constants: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in constants:
        raise ValueError(
            f"The graph has no float Const node {name!r}. Expected a frozen TF-Slim MobileNet v1 1.0/224 graph."
        )
    return constants[name]


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())


def _convolution(
    constants: dict[str, np.ndarray], slim_layer: str, conv_name: str, batch_norm_name: str
) -> dict[str, torch.Tensor]:
    # TensorFlow kernels are (height, width, in, out), but torch expects (out, in, height, width).
    kernel = _constant(constants, f"{SLIM_SCOPE}/{slim_layer}/weights")
    return {f"{conv_name}.weight": _to_tensor(kernel.transpose(3, 2, 0, 1))} | _batch_norm(
        constants, slim_layer, batch_norm_name
    )


def _depthwise_convolution(
    constants: dict[str, np.ndarray], slim_layer: str, conv_name: str, batch_norm_name: str
) -> dict[str, torch.Tensor]:
    # TensorFlow depthwise kernels are (height, width, channels, multiplier), with output channel
    # c * multiplier + m. Torch expects (channels * multiplier, 1, height, width) in the same order.
    kernel = _constant(constants, f"{SLIM_SCOPE}/{slim_layer}/depthwise_weights")
    height, width, channels, multiplier = kernel.shape
    torch_kernel = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width)
    return {f"{conv_name}.weight": _to_tensor(torch_kernel)} | _batch_norm(constants, slim_layer, batch_norm_name)


def _batch_norm(constants: dict[str, np.ndarray], slim_layer: str, batch_norm_name: str) -> dict[str, torch.Tensor]:
    state_dict = {
        f"{batch_norm_name}.{torch_name}": _to_tensor(
            _constant(constants, f"{SLIM_SCOPE}/{slim_layer}/BatchNorm/{slim_name}")
        )
        for slim_name, torch_name in _BATCH_NORM_NAMES.items()
    }
    state_dict[f"{batch_norm_name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return state_dict


def _classifier(constants: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # The logits layer is a 1x1 convolution with kernel (1, 1, features, classes). timm uses a Linear layer.
    kernel = _constant(constants, f"{LOGITS_SCOPE}/weights")
    biases = _constant(constants, f"{LOGITS_SCOPE}/biases")
    return {"classifier.weight": _to_tensor(kernel[0, 0].T), "classifier.bias": _to_tensor(biases)}
