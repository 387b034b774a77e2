"""Classification heads trained on top of frozen backbone features."""

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLPHead"]


class MLPHead(nn.Module):
    """A stack of Linear-ReLU(-Dropout) layers followed by a Linear classifier.

    The heads of the COREL-1K backbone comparison are instances of this class: for example ``hidden=(256, 128)`` with
    ``dropout=(0.4, 0.0)`` is the Xception head Dense(256)-ReLU-Dropout(0.4)-Dense(128)-ReLU-Dense(classes).

    Args:
        in_features: size of the feature vector the backbone delivers.
        num_classes: number of output classes.
        hidden: width of each hidden layer.
        dropout: dropout probability after each hidden layer; one value per hidden layer.
        pool: how the backbone's feature map is turned into the input vector, ``avg`` or ``flatten``.
            The feature pipeline applies the pooling; the head records it so that a checkpoint states
            which features it expects.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (64, 64),
        dropout: Sequence[float] | None = None,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        dropout = list(dropout) if dropout is not None else [0.0] * len(hidden)
        if len(dropout) != len(hidden):
            raise ValueError(
                f"head.dropout has {len(dropout)} values but head.hidden has {len(hidden)} layers: "
                f"give one dropout value per hidden layer."
            )
        self.pool = pool
        layers: list[nn.Module] = []
        width = in_features
        for size, probability in zip(hidden, dropout, strict=True):
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if probability > 0:
                layers.append(nn.Dropout(probability))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def penultimate(self, features: torch.Tensor) -> torch.Tensor:
        """Return the activations that feed the final Linear layer."""
        return self.layers[:-1](features)
