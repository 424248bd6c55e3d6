"""The hand-written MLP and its losses. Nothing distributed is imported here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

N_INPUTS = 28 * 28
N_CLASSES = 10

_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class PixelLinear(nn.Linear):
    """The first layer. It also takes raw uint8 pixels, read as pixel / 255.

    Scaling the 16 x 784 weights instead of the batch x 784 input saves a pass over the batch,
    the largest tensor of a step (a third of a CPU step was spent converting pixels).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return F.linear(x.to(self.weight.dtype), self.weight * (1 / 255), self.bias)
        return super().forward(x)


class MLP(nn.Module):
    """784 -> hidden... -> 10, one activation between layers; forward returns logits.

    Input: images as (N, 784) uint8 pixels, or floats already scaled to [0, 1].
    The output non-linearity belongs to the loss (sigmoid for MSE, softmax for cross-entropy),
    so the argmax of the logits is the prediction either way.
    """

    def __init__(self, hidden: Sequence[int] = (16, 16), activation: str = "relu"):
        super().__init__()
        sizes = [N_INPUTS, *hidden, N_CLASSES]
        pairs = list(zip(sizes, sizes[1:]))
        self.layers = nn.ModuleList([PixelLinear(*pairs[0]), *(nn.Linear(*p) for p in pairs[1:])])
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
    # Over a row of 10 classes, log_softmax is ~7x slower on the CPU than over the columns of
    # the transposed (10, N) logits, where it vectorizes along the batch.
    log_probs = torch.log_softmax(logits.t().contiguous(), dim=0)
    return -log_probs.gather(0, targets.unsqueeze(0)).sum()


# Losses return the *sum* over the samples they see: a rank divides by the global batch size,
# so that summing gradients over ranks gives exactly the sequential mean-loss gradient.
LOSS_SUMS = {"mse": mse_sum, "cross_entropy": cross_entropy_sum}
