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
    """784 -> hidden... -> 10, one activation between layers.

    Input: images as (N, 784) uint8 pixels, or floats already scaled to [0, 1].
    model(x) returns the logits; model(x, targets) the training loss, summed over the samples.
    The output non-linearity belongs to the loss (sigmoid for MSE, softmax for cross-entropy),
    so the argmax of the logits is the prediction either way.

    The training loss runs as one autograd node with its backward written out (`fused`), unless
    a wrapper needs each layer's own forward called (FSDP gathers a layer's parameters in it).
    """

    def __init__(self, hidden: Sequence[int] = (16, 16), activation: str = "relu",
                 loss: str = "cross_entropy"):
        super().__init__()
        sizes = [N_INPUTS, *hidden, N_CLASSES]
        pairs = list(zip(sizes, sizes[1:]))
        self.layers = nn.ModuleList([PixelLinear(*pairs[0]), *(nn.Linear(*p) for p in pairs[1:])])
        self.activation = activation
        self.loss = loss
        self.fused = True
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return self.logits(x)
        if self.fused:
            params = [t for layer in self.layers for t in (layer.weight, layer.bias)]
            return _FusedLossSum.apply(x, targets, self.activation, self.loss, *params)
        return LOSS_SUMS[self.loss](self.logits(x), targets)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self._act(layer(x))
        return self.layers[-1](x)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, loss={self.loss}"


_ACTIVATIONS_INPLACE = {"relu": torch.relu_, "sigmoid": torch.sigmoid_, "tanh": torch.tanh_}
# The derivative of each activation from its output a: the backward ops autograd itself uses.
_ACTIVATION_BACKWARD = {
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "sigmoid": torch.ops.aten.sigmoid_backward,  # grad * a * (1 - a)
    "tanh": torch.ops.aten.tanh_backward,  # grad * (1 - a^2)
}


class _FusedLossSum(torch.autograd.Function):
    """MLP(x, targets) with the backward of the whole network and loss written out.

    The same products and element-wise steps autograd runs (equal to round-off, tested), in
    one node instead of ~15: on a CPU much of a training step is per-operation overhead, and this
    removes ~0.14 ms of ~1.5 (59.6 against 65.2 ms per epoch, docs/PERFORMANCE.md). Parameters
    come as (weight, bias) pairs, first layer first.
    """

    @staticmethod
    def forward(ctx, x, targets, activation, loss, *params):
        weights, biases = list(params[0::2]), list(params[1::2])
        pixels = x.dtype == torch.uint8  # read as pixel / 255: PixelLinear's scaled weights
        if pixels:
            weights[0] = weights[0] * (1 / 255)
        if torch.is_autocast_enabled(x.device.type):
            # What autocast does to the layers' products (--precision bf16): all of them in its
            # dtype, the rest (the loss) in float32; the backward follows the saved dtypes.
            low = torch.get_autocast_dtype(x.device.type)
            weights, biases = [w.to(low) for w in weights], [b.to(low) for b in biases]
        inputs = [x.to(weights[0].dtype)]
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            z = torch.addmm(bias, inputs[-1], weight.t())
            if i < len(weights) - 1:
                inputs.append(_ACTIVATIONS_INPLACE[activation](z))
        if loss == "cross_entropy":  # (10, N): see cross_entropy_sum
            out = torch.log_softmax(z.t().contiguous(), dim=0, dtype=torch.float32)
            total = -out.gather(0, targets.unsqueeze(0)).sum()
        else:
            out = torch.sigmoid(z.float())
            total = 0.5 * (out - F.one_hot(targets, N_CLASSES).to(out.dtype)).square().sum()
        ctx.activation, ctx.loss, ctx.pixels = activation, loss, pixels
        ctx.save_for_backward(targets, out, *inputs, *weights[1:])
        return total

    @staticmethod
    def backward(ctx, grad):
        targets, out, *rest = ctx.saved_tensors
        n_layers = (len(rest) + 1) // 2
        inputs, weights = rest[:n_layers], [None, *rest[n_layers:]]
        if ctx.loss == "cross_entropy":  # softmax - one-hot, kept as (10, N)
            g_t = out.exp()
            # A scalar -1 added at each target: one kernel, no (1, N) tensor filled every step.
            g_t.scatter_(0, targets.unsqueeze(0), -1.0, reduce="add")
        else:  # (sigmoid - one-hot) * sigmoid'
            diff = out - F.one_hot(targets, N_CLASSES).to(out.dtype)
            g_t = torch.ops.aten.sigmoid_backward(diff, out).t()
        g_t.mul_(grad)
        if g_t.dtype != inputs[0].dtype:  # the loss ran in float32, the layers in bf16
            g_t = g_t.to(inputs[0].dtype)
        grads = []
        for i in reversed(range(n_layers)):  # g_t: dL/dz of layer i, transposed (out, N)
            grad_weight = g_t.mm(inputs[i])
            if i == 0 and ctx.pixels:
                grad_weight.mul_(1 / 255)
            grads[:0] = [grad_weight, g_t.sum(1)]
            if i:
                g = _ACTIVATION_BACKWARD[ctx.activation](g_t.t().mm(weights[i]), inputs[i])
                g_t = g.t()
        return None, None, None, None, *grads


def mse_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i 1/2 ||sigmoid(z_i) - onehot(y_i)||^2; divided by M this is L = 1/(2M) sum ||a - y||^2."""
    outputs = torch.sigmoid(logits.float())  # bf16 logits (autocast) too: the loss in float32
    one_hot = F.one_hot(targets, N_CLASSES).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).square().sum()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(z_i)[y_i]."""
    # Over a row of 10 classes, log_softmax is ~7x slower on the CPU than over the columns of
    # the transposed (10, N) logits, where it vectorizes along the batch.
    # dtype: the loss in float32, also from autocast's bf16 logits.
    log_probs = torch.log_softmax(logits.t().contiguous(), dim=0, dtype=torch.float32)
    return -log_probs.gather(0, targets.unsqueeze(0)).sum()


# Losses return the *sum* over the samples they see: a rank divides by the global batch size,
# so that summing gradients over ranks gives exactly the sequential mean-loss gradient.
LOSS_SUMS = {"mse": mse_sum, "cross_entropy": cross_entropy_sum}
