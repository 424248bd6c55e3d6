"""The training step: one update, and what an epoch of them leaves for the host to read.

The loop (train.py) calls a step object once per update and reads its results once per epoch.
Nothing inside an epoch waits for the device: the batch rows are sliced from an order uploaded
once per epoch, each rank's loss goes into a buffer on the device, and the NaN contract is kept
on the device too (NonFiniteGuard). `EagerStep` runs the update op by op; a CUDA-graphed step
would be a second implementation of the same three methods, chosen by `make_step`.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.config import OptimConfig
from dptrain.components.optim import FusedAdam, FusedSGD


class NonFiniteGuard:
    """The NaN contract without a host sync per step: a non-finite update is never applied.

    After each backward, one fused kernel checks every gradient this rank holds and raises
    `flag` (a float32 scalar on the device) if any element is NaN or inf. The flag is sticky
    for the rest of the epoch, and the optimizer kernels skip every update while it is up
    (their found_inf), so the parameters stay those from before the first bad update.
    `skipped` counts the updates skipped; the host reads it once, at the end of the epoch, and
    the first bad update is the one `skipped` updates before the end.

    The loop scales each rank's loss by NaN when it is not finite, which turns every summed
    gradient element NaN on every rank: every rank then skips the same updates.
    """

    def __init__(self, device: torch.device):
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.flag.zero_()
        self.skipped.zero_()

    def check(self, grads: list[torch.Tensor]) -> None:
        """Raise the flag if any of `grads` holds a NaN or inf (they are multiplied by 1.0)."""
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.flag, self._one)
        self.skipped.add_(self.flag)


def make_optimizer(optim: OptimConfig, params, lr: float,
                   skip_if: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The configured optimizer; it skips its update wherever `skip_if` is non-zero."""
    if optim.optimizer == "adam":
        # One fused kernel per step, also on FSDP's sharded parameters: ~15 us on one CPU
        # thread, where torch.optim.Adam takes ~375 (~105 fused). See optim.py.
        return FusedAdam(params, lr=lr, weight_decay=optim.weight_decay, skip_if=skip_if)
    return FusedSGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                    skip_if=skip_if)


class EagerStep:
    """Forward, backward (with the strategy's gradient sum), check and update, op by op."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, samples,
                 guard: NonFiniteGuard, strategy, clip_grad_norm: float = 0.0):
        self.model, self.optimizer, self.samples = model, optimizer, samples
        self.guard, self.strategy = guard, strategy
        self.clip_grad_norm = clip_grad_norm  # 0 = no clipping
        self._losses = torch.zeros(0, dtype=torch.float64, device=samples.device)

    def begin_epoch(self, updates: int) -> None:
        self.guard.reset()
        if len(self._losses) != updates:
            self._losses = torch.zeros(updates, dtype=torch.float64, device=self.samples.device)

    def __call__(self, index: int, rows: torch.Tensor, global_batch: int, lr: float) -> None:
        """Update `index` of the epoch on this rank's `rows` of a global batch of that size."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.samples.batch(rows)
        loss = self.model(x, y)  # this rank's loss sum (MLP.forward with targets)
        self.optimizer.zero_grad(set_to_none=True)
        # The gradient of loss / global batch; NaN if this rank's loss is not finite: then the
        # gradients turn NaN (every summed element) on every rank, and all skip alike.
        (loss * (loss.detach() * 0.0 + 1 / global_batch)).backward()
        self.guard.check(self.strategy.local_gradients(self.model))
        if self.clip_grad_norm:
            self.strategy.clip_gradients(self.model, self.clip_grad_norm)
        self.optimizer.step()
        self._losses[index] = loss.detach()

    def end_epoch(self) -> torch.Tensor:
        """[this rank's loss sum over the epoch, updates skipped] (float64, on the device)."""
        return torch.stack([self._losses.sum(), self.guard.skipped.to(torch.float64)])

    def loss_at(self, index: int) -> float:
        """This rank's loss sum at update `index` of the last epoch (for the stop line)."""
        return self._losses[index].item()


def make_step(strategy, model: nn.Module, optimizer: torch.optim.Optimizer, samples,
              guard: NonFiniteGuard, clip_grad_norm: float = 0.0) -> EagerStep:
    """The step implementation for the strategy's device. The eager step is the only one so
    far; a CUDA-graphed step is the planned second (issue 10), behind these same methods."""
    return EagerStep(model, optimizer, samples, guard, strategy, clip_grad_norm)
