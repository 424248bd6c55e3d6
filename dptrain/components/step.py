"""The training step: one update, and what an epoch of them leaves for the host to read.

The loop (train.py) calls a step object once per update and reads its results once per epoch.
Nothing inside an epoch waits for the device: the batch rows are sliced from an order uploaded
once per epoch, each rank's loss goes into a buffer on the device, and the NaN contract is kept
on the device too (NonFiniteGuard). `EagerStep` runs the update op by op; a CUDA-graphed step
would be a second implementation of the same three methods, chosen by `make_step`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dptrain.config import OptimConfig
from dptrain.components.noise import GradientTap
from dptrain.components.optim import FusedAdam, FusedSGD
from dptrain.errors import UserError


class NonFiniteGuard:
    """The NaN contract without a host sync per step: a non-finite update is never applied.

    After each backward, one fused kernel checks every gradient this rank holds and raises
    `flag` (a float32 scalar on the device) if any element is NaN or inf. The flag is sticky
    for the rest of the epoch, and the optimizer kernels skip every update while it is up
    (their found_inf), so the parameters stay those from before the first bad update. The step
    records the flag beside each update's loss (in the same kernel), so the count of updates
    skipped comes once per epoch, from that record: the first bad update is the one that many
    updates before the end.

    The loop scales each rank's loss by NaN when it is not finite, which turns every summed
    gradient element NaN on every rank: every rank then skips the same updates.
    """

    def __init__(self, device: torch.device):
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.flag.zero_()

    def check(self, grads: list[torch.Tensor]) -> None:
        """Raise the flag if any of `grads` holds a NaN or inf (they are multiplied by 1.0)."""
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.flag, self._one)


def make_optimizer(optim: OptimConfig, params, lr: float,
                   skip_if: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The configured optimizer; it skips its update wherever `skip_if` is non-zero."""
    if optim.optimizer == "adam":
        # One fused kernel per step, also on FSDP's sharded parameters: ~15 us on one CPU
        # thread, where torch.optim.Adam takes ~375 (~105 fused). See optim.py.
        return FusedAdam(params, lr=lr, weight_decay=optim.weight_decay, skip_if=skip_if)
    return FusedSGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                    skip_if=skip_if)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where forward passes run at `precision`: bf16 under torch.autocast (products in bf16,
    weights and their gradients float32), fp32 as they are."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EagerStep:
    """Forward, backward (with the strategy's gradient sum), check and update, op by op.

    With `accumulate` K > 1, a rank's rows of an update run as K micro-batches whose gradients
    add up on the rank; only the last backward sums over ranks. The loss scale stays 1/global
    batch, so the update is the one of K = 1, up to round-off.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, samples,
                 guard: NonFiniteGuard, strategy, clip_grad_norm: float = 0.0, *,
                 telemetry, accumulate: int = 1, precision: str = "fp32",
                 tap: GradientTap | None = None):
        self.model, self.optimizer, self.samples = model, optimizer, samples
        self.guard, self.strategy, self.accumulate = guard, strategy, accumulate
        self.telemetry = telemetry  # times the phases (telemetry.phase)
        self.clip_grad_norm = clip_grad_norm  # 0 = no clipping
        self._autocast = autocast(precision, samples.device)  # entered once per forward
        self.tap = tap  # the gradient noise scale's norms (noise.py), where a run has them
        # Per update of the epoch: [this rank's loss sum, the guard's flag after its check].
        self._record = torch.zeros(0, 2, dtype=torch.float32, device=samples.device)

    def begin_epoch(self, updates: int) -> None:
        self.guard.reset()
        if self.tap is not None:
            self.tap.begin_epoch(updates)
        if len(self._record) != updates:
            self._record = torch.zeros(updates, 2, dtype=torch.float32, device=self.samples.device)

    def __call__(self, index: int, rows: torch.Tensor, global_batch: int, lr: float) -> None:
        """Update `index` of the epoch on this rank's `rows` of a global batch of that size."""
        with self.telemetry.phase("optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.tap is not None:
                self.tap.begin_update(index)
            self.optimizer.zero_grad(set_to_none=True)
        # Every rank runs K micro-batches (fsdp gathers parameters in each forward); those of a
        # short tail batch may be empty.
        *first, last = rows.tensor_split(self.accumulate) if self.accumulate > 1 else (rows,)
        losses = []
        for micro_rows in first:
            with self.strategy.no_gradient_sync(self.model):
                losses.append(self._forward_backward(micro_rows, global_batch))
        losses.append(self._forward_backward(last, global_batch))
        with self.telemetry.phase("optimizer"):
            grads = self.strategy.local_gradients(self.model)
            self.guard.check(grads)
            if self.tap is not None:  # the summed gradient as computed, before any clipping
                self.tap.summed(grads)
            if self.clip_grad_norm:
                self.strategy.clip_gradients(self.model, self.clip_grad_norm)
            self.optimizer.step()
            loss = losses[0] if not first else torch.stack(losses).sum()
            torch.stack((loss, self.guard.flag), out=self._record[index])

    def _forward_backward(self, rows: torch.Tensor, global_batch: int) -> torch.Tensor:
        """Add the gradient of this loss sum / global batch; returns the loss sum (detached)."""
        phase = self.telemetry.phase
        with phase("batch"):
            x, y = self.samples.batch(rows)
        with phase("forward_backward"):
            with self._autocast:  # backward follows the dtypes it chose
                loss = self.model(x, y)  # this rank's loss sum (MLP.forward with targets)
            # The gradient of loss / global batch; NaN if this rank's loss is not finite: then
            # the gradients turn NaN (every summed element) on every rank, and all skip alike.
            # A product node, not backward(gradient): a gradient argument makes torch import
            # sympy (torch.fx's shape checks) on the first backward, 0.24-0.36 s of a 1.4 s seq.
            (loss * (loss.detach() * 0.0 + 1 / global_batch)).backward()
        return loss.detach()

    def end_epoch(self) -> torch.Tensor:
        """[this rank's loss sum over the epoch, updates skipped, then the tap's matrix, if
        any] (float64, on the device): what the epoch's one all-reduce sums."""
        totals = self._record.sum(0, dtype=torch.float64)
        if self.tap is None:
            return totals
        return torch.cat([totals, self.tap.end_epoch(len(self._record))])

    def loss_at(self, index: int) -> float:
        """This rank's loss sum at update `index` of the last epoch (for the stop line)."""
        return self._record[index, 0].item()


def make_step(strategy, model: nn.Module, optimizer: torch.optim.Optimizer, samples,
              guard: NonFiniteGuard, clip_grad_norm: float = 0.0, *, telemetry=None,
              accumulate: int = 1, precision: str = "fp32",
              tap: GradientTap | None = None) -> EagerStep:
    """The step implementation for the strategy's device. The eager step is the only one so
    far; a CUDA-graphed step is the planned second (issue 10), behind these same methods.
    `telemetry` times its phases (telemetry.phase); without one, nothing is timed."""
    from dptrain.telemetry import Telemetry

    telemetry = telemetry or Telemetry(updates=0)
    device = strategy.device
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                        "bfloat16 support; use --precision fp32")
    return EagerStep(model, optimizer, samples, guard, strategy, clip_grad_norm,
                     telemetry=telemetry, accumulate=accumulate, precision=precision, tap=tap)
