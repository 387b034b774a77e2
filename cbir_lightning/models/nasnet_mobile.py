"""NASNet-A Mobile, the architecture of Keras' ``NASNetMobile``, registered in timm as ``nasnetamobile``.

timm 1.0 ships only NASNet-A Large. This module follows ``keras.applications.nasnet.NASNet`` (read in Keras
3.15) with the ``NASNetMobile`` arguments: penultimate_filters=1056, num_blocks=4, stem_block_filters=32,
skip_reduction=False and filter_multiplier=2. Every detail that changes the output matches Keras, so that
Keras' weights load one to one (see :mod:`cbir_lightning.models.weights.keras_h5`):

* Strided convolutions pad like TensorFlow's "SAME": for an even input size, the extra row and column
  go at the bottom and right.
* The stride-2 pools of a reduction cell run on an explicitly zero-padded input, so the zeros take part
  in the max and the average. The stride-1 average pools exclude the padding from the count.
* BatchNorm uses eps 1e-3 and Keras' momentum 0.9997, which is 3e-4 in PyTorch's convention.
* A ReLU precedes every convolution inside the cells, and the final map passes through a ReLU
  (``act_final``, the Grad-CAM target layer).
* Concatenations keep Keras' order.

The cells sit in ``cells``, keyed by Keras' block ids (``stem_1``, ``stem_2``, ``0``-``3``, ``reduce_4``,
``5``-``8``, ``reduce_8``, ``9``-``12``), so that module paths and Keras layer names line up.

At 224 x 224 the final map is 1056 x 7 x 7. The model has 5,289,978 parameters with the 1000-class
classifier; Keras reports 5,326,716 because it also counts the 36,738 BatchNorm moving statistics, which
are buffers in PyTorch.
"""

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, create_conv2d
from timm.layers.padding import pad_same
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["NASNetAMobile"]

BN_EPS = 1e-3
# Keras' BatchNormalization momentum 0.9997 is the decay of the moving averages. PyTorch's momentum is 1 - decay.
BN_MOMENTUM = 1.0 - 0.9997


def _batch_norm(num_features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


def _avg_pool_same() -> nn.AvgPool2d:
    # TensorFlow's "SAME" average pooling divides by the number of real pixels in each window.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class ReluConvBn(nn.Module):
    """ReLU, 1x1 convolution and BatchNorm: a cell's input projection."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        # Not in-place: the cell input is also the next cell's previous input.
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn = _batch_norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.act(x)))


class SeparableConv2d(nn.Module):
    """Keras' ``SeparableConv2D`` without bias: a depthwise convolution, then a 1x1 pointwise convolution."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        # padding="same" is TensorFlow's "SAME": static and symmetric at stride 1, computed per input at stride 2.
        self.depthwise = create_conv2d(
            in_chs, in_chs, kernel_size, stride=stride, padding="same", depthwise=True, bias=False
        )
        self.pointwise = nn.Conv2d(in_chs, out_chs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class SeparableBranch(nn.Module):
    """Two ReLU, separable convolution and BatchNorm stacks (Keras' ``_separable_conv_block``).

    Only the first convolution strides, and it already outputs ``out_chs`` channels.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.act_1 = nn.ReLU()
        self.separable_1 = SeparableConv2d(in_chs, out_chs, kernel_size, stride)
        self.bn_1 = _batch_norm(out_chs)
        self.act_2 = nn.ReLU(inplace=True)
        self.separable_2 = SeparableConv2d(out_chs, out_chs, kernel_size)
        self.bn_2 = _batch_norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_1(self.separable_1(self.act_1(x)))
        return self.bn_2(self.separable_2(self.act_2(x)))


class FactorizedReduction(nn.Module):
    """Bring the previous cell's output to half its resolution with two 1x1 convolutions on offset pixel grids.

    The first path reads the even rows and columns. Keras builds the second path by padding the bottom and
    right by one and cropping the top and left by one before its stride-2 1x1 average pool. That path reads
    the odd rows and columns, so for an odd input size its last row and column are zeros.
    """

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv_1 = nn.Conv2d(in_chs, out_chs // 2, 1, bias=False)
        self.conv_2 = nn.Conv2d(in_chs, out_chs // 2, 1, bias=False)
        self.bn = _batch_norm(out_chs // 2 * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path_1 = self.conv_1(x[:, :, ::2, ::2])
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        path_2 = self.conv_2(shifted[:, :, ::2, ::2])
        return self.bn(torch.cat([path_1, path_2], dim=1))


class ZeroPadSame(nn.Module):
    """Zero-pad as TensorFlow's "SAME" does for ``kernel_size`` and ``stride`` (Keras' ``correct_pad`` at stride 2)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel_size, self.stride)


def _adjust_block(in_chs: int, prev_chs: int | None, filters: int, prev_is_larger: bool) -> tuple[nn.Module, int]:
    """Build Keras' ``_adjust_block`` for a cell, and return it with its output channels.

    ``prev_chs=None`` marks the first cell, which uses its own input as the previous input. Keras picks
    the variant from the tensor shapes. Here the architecture fixes it, which gives the same choice for
    inputs of at least 32 x 32 pixels, the minimum that Keras accepts.
    """
    if prev_chs is None:
        return nn.Identity(), in_chs
    if prev_is_larger:
        return FactorizedReduction(prev_chs, filters), filters // 2 * 2
    if prev_chs != filters:
        return ReluConvBn(prev_chs, filters), filters
    return nn.Identity(), prev_chs


class NormalCell(nn.Module):
    """NASNet-A normal cell (Keras' ``_normal_a_cell``): keeps the resolution, outputs ``6 * filters`` channels.

    Each ``block<N>_<side>`` module is Keras' ``normal_<side><N>`` branch.
    """

    def __init__(self, in_chs: int, prev_chs: int | None, filters: int, prev_is_larger: bool) -> None:
        super().__init__()
        self.adjust, prev_out_chs = _adjust_block(in_chs, prev_chs, filters, prev_is_larger)
        if prev_out_chs != filters:
            raise ValueError(f"A normal cell needs a previous input of {filters} channels, got {prev_out_chs}.")
        self.conv_1x1 = ReluConvBn(in_chs, filters)
        self.block1_left = SeparableBranch(filters, filters, 5)
        self.block1_right = SeparableBranch(filters, filters, 3)
        self.block2_left = SeparableBranch(filters, filters, 5)
        self.block2_right = SeparableBranch(filters, filters, 3)
        self.block3_left = _avg_pool_same()
        self.block4_left = _avg_pool_same()
        self.block4_right = _avg_pool_same()
        self.block5_left = SeparableBranch(filters, filters, 3)
        self.out_chs = 6 * filters
        self.reduces = False

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        p = self.adjust(x_prev)
        h = self.conv_1x1(x)
        x1 = self.block1_left(h) + self.block1_right(p)
        x2 = self.block2_left(p) + self.block2_right(p)
        x3 = self.block3_left(h) + p
        x4 = self.block4_left(p) + self.block4_right(p)
        x5 = self.block5_left(h) + h
        return torch.cat([p, x1, x2, x3, x4, x5], dim=1)


class ReductionCell(nn.Module):
    """NASNet-A reduction cell (Keras' ``_reduction_a_cell``): halves the resolution, outputs ``4 * filters`` channels.

    Each ``block<N>_<side>`` module is Keras' ``reduction_<side><N>`` layer, except ``block5_left``, which
    Keras names ``reduction_left4`` like the average pool of block 4.
    """

    def __init__(self, in_chs: int, prev_chs: int | None, filters: int, prev_is_larger: bool) -> None:
        super().__init__()
        self.adjust, prev_out_chs = _adjust_block(in_chs, prev_chs, filters, prev_is_larger)
        self.conv_1x1 = ReluConvBn(in_chs, filters)
        self.pad = ZeroPadSame(3, 2)
        self.block1_left = SeparableBranch(filters, filters, 5, stride=2)
        self.block1_right = SeparableBranch(prev_out_chs, filters, 7, stride=2)
        self.block2_left = nn.MaxPool2d(3, stride=2)
        self.block2_right = SeparableBranch(prev_out_chs, filters, 7, stride=2)
        self.block3_left = nn.AvgPool2d(3, stride=2)
        self.block3_right = SeparableBranch(prev_out_chs, filters, 5, stride=2)
        self.block4_left = _avg_pool_same()
        self.block5_left = SeparableBranch(filters, filters, 3)
        self.block5_right = nn.MaxPool2d(3, stride=2)
        self.out_chs = 4 * filters
        self.reduces = True

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        p = self.adjust(x_prev)
        h = self.conv_1x1(x)
        h_padded = self.pad(h)
        x1 = self.block1_left(h) + self.block1_right(p)
        x2 = self.block2_left(h_padded) + self.block2_right(p)
        x3 = self.block3_left(h_padded) + self.block3_right(p)
        x4 = self.block4_left(x1) + x2
        x5 = self.block5_left(x1) + self.block5_right(h_padded)
        return torch.cat([x2, x3, x4, x5], dim=1)


def _cell_layout(filters: int, num_blocks: int, filter_multiplier: int) -> list[tuple[str, bool, int]]:
    """List ``(Keras block id, is a reduction cell, filters)`` for every cell in forward order."""
    layout = [
        ("stem_1", True, filters // filter_multiplier**2),
        ("stem_2", True, filters // filter_multiplier),
    ]
    for stage in range(3):
        stage_filters = filters * filter_multiplier**stage
        if stage > 0:
            layout.append((f"reduce_{stage * num_blocks}", True, stage_filters))
        # Keras numbers the normal cells 0..n-1, then n+1..2n and 2n+1..3n, skipping the reduction ids.
        first_id = stage * num_blocks + (1 if stage > 0 else 0)
        layout.extend((str(first_id + index), False, stage_filters) for index in range(num_blocks))
    return layout


class NASNetAMobile(nn.Module):
    """NASNet-A with Keras' ``NASNetMobile`` settings: 4 normal cells per stage and 1056 final channels.

    Every cell takes the outputs of the two cells before it: Mobile is built with ``skip_reduction=False``,
    so the cell after a reduction cell reads that reduction cell's input as its previous input.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        num_features: int = 1056,
        stem_size: int = 32,
        num_blocks: int = 4,
        filter_multiplier: int = 2,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if num_features % (24 * filter_multiplier**2) != 0:
            raise ValueError(
                f"num_features={num_features} must be a multiple of 24 * filter_multiplier**2 "
                f"= {24 * filter_multiplier**2}, as in Keras' NASNet."
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate

        # Keras' stem convolution has "valid" padding: 224 px become 111.
        self.stem_conv = nn.Conv2d(in_chans, stem_size, 3, stride=2, bias=False)
        self.stem_bn = _batch_norm(stem_size)
        self.cells = nn.ModuleDict()
        self.feature_info = [{"num_chs": stem_size, "reduction": 2, "module": "cells.stem_1.conv_1x1.act"}]

        filters = num_features // 24
        layout = _cell_layout(filters, num_blocks, filter_multiplier)
        x_chs, x_reduction = stem_size, 2
        prev_chs, prev_reduction = None, None
        for index, (block_id, is_reduction, cell_filters) in enumerate(layout):
            prev_is_larger = prev_reduction is not None and prev_reduction < x_reduction
            cell_class = ReductionCell if is_reduction else NormalCell
            self.cells[block_id] = cell_class(x_chs, prev_chs, cell_filters, prev_is_larger)
            prev_chs, prev_reduction = x_chs, x_reduction
            x_chs = self.cells[block_id].out_chs
            x_reduction *= 2 if is_reduction else 1
            # A stage's last map is tapped at the ReLU that the next (reduction) cell applies to it.
            next_is_reduction = index + 1 < len(layout) and layout[index + 1][1]
            if next_is_reduction:
                next_id = layout[index + 1][0]
                tap = f"cells.{next_id}.conv_1x1.act"
                self.feature_info.append({"num_chs": x_chs, "reduction": x_reduction, "module": tap})
        if x_chs != num_features:
            raise ValueError(f"The last cell outputs {x_chs} channels, expected num_features={num_features}.")

        self.act_final = nn.ReLU()
        self.feature_info.append({"num_chs": num_features, "reduction": x_reduction, "module": "act_final"})
        self.global_pool, self.head_drop, self.classifier = create_classifier(
            num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Keras initialises the plain convolutions with he_normal. BatchNorm and Linear keep PyTorch's defaults.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Return the final Linear layer (``nn.Identity`` when ``num_classes=0``)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one of ``num_classes`` outputs (``global_pool=''`` removes pooling)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the final activated feature map, ``(batch, 1056, H / 32, W / 32)`` rounded up."""
        x = self.stem_bn(self.stem_conv(x))
        x_prev = x  # the first cell uses its own input as the previous input
        for cell in self.cells.values():
            x_prev, x = x, cell(x, x_prev)
        return self.act_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map and apply dropout and the classifier (not with ``pre_logits=True``)."""
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_nasnet_mobile(variant: str, pretrained: bool = False, **kwargs) -> NASNetAMobile:
    # The cells take two inputs, so timm cannot rewrite the model into a sequence. Features come from hooks.
    return build_model_with_cfg(
        NASNetAMobile,
        variant,
        pretrained,
        feature_cfg={"feature_cls": "hook", "no_rewrite": True},
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        # No download: the ImageNet weights exist only as Keras files (NASNet-mobile.h5, NASNet-mobile-no-top.h5).
        # Load them with weights.source=file. Keras' preprocess_input for NASNet maps pixels to x / 127.5 - 1,
        # which is mean = std = 0.5. Keras prescribes no crop or resize filter: the 87.5 % centre crop and the
        # bilinear resize are those of TF-slim's Inception evaluation preprocessing.
        "nasnetamobile.tf_in1k": {
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "num_classes": 1000,
            "first_conv": "stem_conv",
            "classifier": "classifier",
            "license": "apache-2.0",
        },
    }
)


@register_model
def nasnetamobile(pretrained: bool = False, **kwargs) -> NASNetAMobile:
    """NASNet-A Mobile (Keras ``NASNetMobile``), 4 @ 1056. timm has no download for it."""
    return _create_nasnet_mobile("nasnetamobile", pretrained, **kwargs)
