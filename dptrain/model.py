"""The hand-written MLP and its losses. Nothing distributed is imported here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

N_INPUTS = 28 * 28
N_CLASSES = 10

_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class MLP(nn.Module):
    """784 -> hidden... -> 10, one activation between layers; forward returns logits.

    The output non-linearity belongs to the loss (sigmoid for MSE, softmax for cross-entropy),
    so the argmax of the logits is the prediction either way.
    """

    def __init__(self, hidden: Sequence[int] = (16, 16), activation: str = "relu"):
        super().__init__()
        sizes = [N_INPUTS, *hidden, N_CLASSES]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.activation = activation
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self._act(layer(x))
        return self.layers[-1](x)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def mse_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i 1/2 ||sigmoid(z_i) - onehot(y_i)||^2; divided by M this is L = 1/(2M) sum ||a - y||^2."""
    outputs = torch.sigmoid(logits)
    one_hot = F.one_hot(targets, N_CLASSES).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).square().sum()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(z_i)[y_i]."""
    return F.cross_entropy(logits, targets, reduction="sum")


# Losses return the *sum* over the samples they see: a rank divides by the global batch size,
# so that summing gradients over ranks gives exactly the sequential mean-loss gradient.
LOSS_SUMS = {"mse": mse_sum, "cross_entropy": cross_entropy_sum}
