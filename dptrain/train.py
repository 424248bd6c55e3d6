"""The one training loop, shared by seq, ddp and fsdp.

Each update takes one global batch from a shuffled order that every rank computes alike; a rank
works on its contiguous slice of it and divides its loss sum by the *global* batch size. With the
strategy summing gradients over ranks, every mode applies the same update as the sequential run.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dptrain.storage import checkpoint
from dptrain.storage.checkpoint import Checkpoint
from dptrain.config import Config, Plan
from dptrain.components.best import best_record, early_stop_line, is_new_best
from dptrain.components.data import Mnist, Split, epoch_order, shard_bounds
from dptrain.errors import UserError
from dptrain.components.model import LOSS_SUMS, MLP
from dptrain.components.noise import epoch_batches, estimate
from dptrain.storage.runlog import RunLog
from dptrain.components.step import (EagerStep, NonFiniteGuard, autocast, make_optimizer,
                                     make_step)
from dptrain.distributed.strategy import Strategy
from dptrain.telemetry import Telemetry
from dptrain.telemetry.phases import run_totals

LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A mean train loss above this has diverged: a million times chance level (ln 10 nats per
# sample for cross-entropy; the MSE of sigmoid outputs cannot exceed 5). Adam at lr 1e9 reached
# 3.8e28 in its first epoch without a NaN, then trained on at 10% accuracy.
DIVERGED_LOSS = 1e6 * math.log(10)


class NonFinite(Exception):
    """The loss or the gradients of update `step` are NaN or inf; the update was not applied."""

    def __init__(self, step: int, local_loss: float):
        super().__init__(step, local_loss)
        self.step = step
        self.local_loss = local_loss


class Samples:
    """MNIST as tensors on the training device: uint8 pixels, which the model reads as pixel / 255."""

    def __init__(self, mnist: Mnist, device: torch.device):
        self.device = device
        # On the CPU this shares the memory map; a GPU gets one uint8 copy (55 MB).
        self.images = torch.from_numpy(mnist.images).to(device)
        self.labels = torch.from_numpy(mnist.labels).to(device=device, dtype=torch.int64)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """Row indices on the device: one copy for a whole epoch, none per batch."""
        rows = torch.from_numpy(rows)
        if self.device.type != "cuda":
            return rows
        # From pinned memory the copy runs asynchronously, without the host staging it.
        return rows.pin_memory().to(self.device, non_blocking=True)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.index_select(0, rows), self.labels.index_select(0, rows)


def global_batches(order, batch: int) -> Iterator:
    for start in range(0, len(order), batch):
        yield order[start:start + batch]


def rank_slice(rows, strategy: Strategy):
    lo, hi = shard_bounds(len(rows), strategy.env.rank, strategy.env.world_size)
    return rows[lo:hi]


@torch.no_grad()
def evaluate(model: nn.Module, samples: Samples, rows: np.ndarray, strategy: Strategy,
             loss_sum: LossSum, batch: int, precision: str = "fp32") -> tuple[float, float]:
    """(mean loss, accuracy) over `rows`, computed across all ranks.

    Every rank runs the same number of forward passes (FSDP gathers parameters in each), at
    the training precision (fsdp's bf16 parameters allow no other, and every mode does alike).
    """
    totals = torch.zeros(2, dtype=torch.float64, device=samples.device)
    for chunk in global_batches(samples.rows(rows), batch):
        x, y = samples.batch(rank_slice(chunk, strategy))
        with autocast(precision, samples.device):
            logits = model(x)
        totals[0] += loss_sum(logits, y)
        totals[1] += (logits.argmax(dim=1) == y).sum()
    strategy.after_evaluation(model)
    loss, correct = strategy.all_reduce_sum(totals).tolist()
    return loss / len(rows), correct / len(rows)


def train_epoch(step: EagerStep, samples: Samples, order: np.ndarray, plan: Plan,
                strategy: Strategy, first_step: int, telemetry: Telemetry) -> tuple[float, dict]:
    """One pass over the train split; returns the mean train loss over all ranks and the
    epoch's gradient noise scale record (noise.estimate; empty where the run has none).

    The host reads the device once, at the end. Raises NonFinite if an update's gradients were
    not finite on any rank: that update and the rest of the epoch's were not applied.
    """
    step.begin_epoch(plan.updates_per_epoch)
    with telemetry.phase("batch"):
        batches = global_batches(samples.rows(order[:plan.samples_per_epoch]), plan.global_batch)
    for index, rows in enumerate(batches):
        telemetry.update(index)
        step(index, rank_slice(rows, strategy), len(rows), plan.lr_at(first_step + index))
    with telemetry.phase("epoch_end"):
        loss_sum, skipped, *norms = strategy.all_reduce_sum(step.end_epoch()).tolist()
    if skipped:
        # Ranks that hold different gradient shards (fsdp) may have stopped at different
        # updates; the earliest counts. Only a run that is about to stop gets here.
        first = plan.updates_per_epoch - max(strategy.gather_object(int(step.end_epoch()[1])))
        raise NonFinite(first_step + first, step.loss_at(first))
    noise = {}
    if step.tap is not None:
        batches = step.tap.read(epoch_batches(plan.samples_per_epoch, plan.global_batch))
        noise = estimate(norms, batches, step.tap.parts, plan.n_train)
    return loss_sum / plan.samples_per_epoch, noise


def train(config: Config, plan: Plan, strategy: Strategy, mnist: Mnist, split: Split,
          log: RunLog, telemetry: Telemetry, resume: Checkpoint | None = None) -> dict:
    """Train (from a checkpoint when given), logging each epoch's validation and checkpointing,
    then test; returns the results and the full state. `telemetry` times the epochs' phases."""
    torch.manual_seed(config.train.seed)  # the same initial parameters on every rank and mode
    model = strategy.wrap(MLP(config.model.hidden, config.model.activation, config.train.loss),
                          precision=config.train.precision, telemetry=telemetry)
    samples = Samples(mnist, strategy.device)
    guard = NonFiniteGuard(strategy.device)
    build = functools.partial(make_optimizer, config.optim, lr=plan.lr_at(0), skip_if=guard.flag)
    optimizer = strategy.make_optimizer(build, model)
    records, earlier_seconds = [], 0.0
    if resume is not None:
        checkpoint.restore(strategy, model, optimizer, resume)
        records, earlier_seconds = list(resume.records), resume.meta["train_seconds"]
    loss_sum = LOSS_SUMS[config.train.loss]
    # The noise scale's small batches: the ranks' shares, or seq's micro-batches (noise.py).
    tap = strategy.gradient_tap(model, micro_batches=config.train.accumulate,
                                every=config.run.noise_every)
    step = make_step(strategy, model, optimizer, samples, guard, config.optim.clip_grad_norm,
                     telemetry=telemetry, accumulate=config.train.accumulate,
                     precision=config.train.precision, tap=tap)
    evaluate_ = functools.partial(evaluate, model, samples, strategy=strategy, loss_sum=loss_sum,
                                  batch=config.train.eval_batch_size,
                                  precision=config.train.precision)

    loop_start, saving = time.perf_counter(), 0.0
    stop = early_stop_line(records, config.train)  # a resumed run that had already stopped
    if stop:
        log.note(stop)
    for epoch in range(len(records) + 1, config.train.epochs + 1):
        if stop:
            break
        start = time.perf_counter()
        first_step = (epoch - 1) * plan.updates_per_epoch
        telemetry.begin_epoch(epoch, first_step)
        with telemetry.phase("batch"):  # the epoch's shuffle: the index of its batches
            order = epoch_order(split.train, config.train.seed, epoch)
        try:
            train_loss, noise = train_epoch(step, samples, order, plan, strategy, first_step,
                                            telemetry)
        except NonFinite as e:
            raise _diverged(e, epoch, plan, log.out) from None
        with telemetry.phase("epoch_end"):  # local SGD's last average, if due: a collective
            strategy.end_epoch(model)
        if train_loss > DIVERGED_LOSS:  # the same reduced value on every rank: all stop
            raise UserError(f"the loss diverged: epoch {epoch}'s mean train loss is "
                            f"{train_loss:.3g}, over a million times chance level; not "
                            f"checkpointed; {_kept(log.out)}. Lower --lr")
        epoch_seconds = time.perf_counter() - start
        phases = telemetry.end_epoch(strategy.all_gather)  # not part of the epoch's seconds
        val_start = time.perf_counter()
        with telemetry.phase("evaluation"):
            val_loss, val_accuracy = evaluate_(split.val)
        records.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_accuracy,
                        "lr": plan.lr_at(first_step + plan.updates_per_epoch - 1),  # the last
                        "epoch_seconds": epoch_seconds,
                        "val_seconds": time.perf_counter() - val_start,
                        "samples_per_second": plan.samples_per_epoch / epoch_seconds,
                        "checkpoint_seconds": 0.0, **noise, **phases})
        # Every rank holds the same records, so all decide alike (no collective).
        stop = early_stop_line(records, config.train)
        trained = earlier_seconds + time.perf_counter() - loop_start - saving
        with telemetry.phase("checkpoint"):
            # An early stop is checkpointed as a last epoch is: to export the run or train it on.
            if _checkpoint_due(config, epoch) or (stop and config.run.checkpoint_every):
                saving += _save(config, plan, strategy, model, optimizer, log, records, trained)
            if config.run.keep_best and is_new_best(records, config.train.best_metric):
                saving += _save(config, plan, strategy, model, optimizer, log, records,
                                trained, best=True)
        log.epoch(records[-1])
        telemetry.write(records[-1])
        if stop:
            log.note(stop)
    # Checkpoint writing is not training: it is reported apart, as checkpoint_seconds.
    train_seconds = earlier_seconds + time.perf_counter() - loop_start - saving

    with telemetry.phase("evaluation"):
        test_loss, test_accuracy = evaluate_(split.test)
    memory = strategy.memory_report(model, optimizer)
    state = strategy.full_state_dict(model)
    last, best = records[-1], best_record(records, config.train.best_metric)
    return {"train_seconds": train_seconds, "train_loss": last["train_loss"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "checkpoint_seconds": sum(r["checkpoint_seconds"] for r in records),
            "val_seconds": sum(r["val_seconds"] for r in records), **run_totals(records),
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            "epochs_trained": last["epoch"], "stopped_early": bool(stop),
            "best_epoch": best["epoch"], "best_metric": config.train.best_metric,
            "best_value": best[config.train.best_metric],
            **({"noise_scale": last["noise_scale"]} if "noise_scale" in last else {}),
            "memory": memory, "state_dict": state}


def _save(config: Config, plan: Plan, strategy: Strategy, model, optimizer, log: RunLog,
          records: list[dict], train_seconds: float, *, best: bool = False) -> float:
    """Checkpoint the last epoch of `records` into the --keep rotation, or as the best;
    returns the seconds it took."""
    epoch = records[-1]["epoch"]
    if not strategy.parameters_finite(model):  # never checkpoint a diverged model
        raise UserError(f"the parameters became non-finite during epoch {epoch} (a gradient "
                        f"overflowed); not checkpointed; {_kept(log.out)}. Lower --lr, or "
                        "check the data")
    start = time.perf_counter()
    meta = checkpoint.manifest(
        epoch=epoch, step=epoch * plan.updates_per_epoch, mode=strategy.mode,
        world_size=strategy.env.world_size, config=config, plan=plan, records=records,
        train_seconds=train_seconds, checkpoint_format=strategy.checkpoint_format)
    checkpoint.write(strategy, model, optimizer, log.out, meta, config.run.keep, best=best)
    return time.perf_counter() - start


def _checkpoint_due(config: Config, epoch: int) -> bool:
    """Every checkpoint_every epochs, and after the last (to extend or export the run)."""
    every = config.run.checkpoint_every
    return bool(every) and (epoch % every == 0 or epoch == config.train.epochs)


def _diverged(e: NonFinite, epoch: int, plan: Plan, out) -> UserError:
    """The one line for a NaN/inf stop: where, and what is left to resume from."""
    return UserError(f"the loss or its gradients became non-finite (this rank's loss: "
                     f"{e.local_loss}) at epoch {epoch}, step {e.step - (epoch - 1) * plan.updates_per_epoch + 1} "
                     f"of {plan.updates_per_epoch} (update {e.step + 1} of the run); stopped "
                     f"before applying it; {_kept(out)}. Lower --lr, or check the data")


def _kept(out) -> str:
    found, _ = checkpoint.latest(out)
    return (f"the last good checkpoint is {found.path}" if found
            else "no checkpoint was written before it")
