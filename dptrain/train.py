"""The one training loop, shared by seq, ddp and fsdp.

Each update takes one global batch from a shuffled order that every rank computes alike; a rank
works on its contiguous slice of it and divides its loss sum by the *global* batch size. With the
strategy summing gradients over ranks, every mode applies the same update as the sequential run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dptrain.config import Config, OptimConfig, Plan
from dptrain.data import Mnist, Split, epoch_order, shard_bounds
from dptrain.model import LOSS_SUMS, MLP
from dptrain.optim import FusedAdam
from dptrain.runlog import RunLog
from dptrain.strategy import Strategy

LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Samples:
    """MNIST as tensors on the training device: uint8 pixels, which the model reads as pixel / 255."""

    def __init__(self, mnist: Mnist, device: torch.device):
        self.device = device
        # On the CPU this shares the memory map; a GPU gets one uint8 copy (55 MB).
        self.images = torch.from_numpy(mnist.images).to(device)
        self.labels = torch.from_numpy(mnist.labels).to(device=device, dtype=torch.int64)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows).to(self.device)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def global_batches(order: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch):
        yield order[start:start + batch]


def rank_slice(rows: np.ndarray, strategy: Strategy) -> np.ndarray:
    lo, hi = shard_bounds(len(rows), strategy.env.rank, strategy.env.world_size)
    return rows[lo:hi]


def make_optimizer(optim: OptimConfig, params, lr: float) -> torch.optim.Optimizer:
    if optim.optimizer == "adam":
        # One fused kernel per step, also on FSDP's sharded parameters: ~15 us on one CPU
        # thread, where torch.optim.Adam takes ~375 (~105 fused). See optim.py.
        return FusedAdam(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, samples: Samples, rows: np.ndarray, strategy: Strategy,
             loss_sum: LossSum, batch: int) -> tuple[float, float]:
    """(mean loss, accuracy) over `rows`, computed across all ranks.

    Every rank runs the same number of forward passes (FSDP gathers parameters in each).
    """
    totals = torch.zeros(2, dtype=torch.float64, device=samples.device)
    for chunk in global_batches(rows, batch):
        x, y = samples.batch(rank_slice(chunk, strategy))
        logits = model(x)
        totals[0] += loss_sum(logits, y)
        totals[1] += (logits.argmax(dim=1) == y).sum()
    loss, correct = strategy.all_reduce_sum(totals).tolist()
    return loss / len(rows), correct / len(rows)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, samples: Samples,
                order: np.ndarray, plan: Plan, strategy: Strategy, loss_sum: LossSum,
                first_step: int) -> float:
    """One pass over the train split; returns the mean train loss over all ranks."""
    total = torch.zeros((), dtype=torch.float64, device=samples.device)
    batches = global_batches(order[:plan.samples_per_epoch], plan.global_batch)
    for step, rows in enumerate(batches, start=first_step):
        for group in optimizer.param_groups:
            group["lr"] = plan.lr_at(step)
        x, y = samples.batch(rank_slice(rows, strategy))
        loss = loss_sum(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(rows)).backward()
        optimizer.step()
        total += loss.detach()
    return strategy.all_reduce_sum(total).item() / plan.samples_per_epoch


def train(config: Config, plan: Plan, strategy: Strategy, mnist: Mnist, split: Split,
          log: RunLog) -> dict:
    """Train, logging each epoch's validation, then test; returns the results and full state."""
    torch.manual_seed(config.train.seed)  # the same initial parameters on every rank and mode
    model = strategy.wrap(MLP(config.model.hidden, config.model.activation))
    optimizer = make_optimizer(config.optim, model.parameters(), plan.lr_at(0))
    loss_sum = LOSS_SUMS[config.train.loss]
    samples = Samples(mnist, strategy.device)
    eval_batch = config.train.eval_batch_size

    loop_start = time.perf_counter()
    for epoch in range(1, config.train.epochs + 1):
        start = time.perf_counter()
        order = epoch_order(split.train, config.train.seed, epoch)
        first_step = (epoch - 1) * plan.updates_per_epoch
        train_loss = train_epoch(model, optimizer, samples, order, plan, strategy, loss_sum,
                                 first_step)
        epoch_seconds = time.perf_counter() - start
        val_loss, val_accuracy = evaluate(model, samples, split.val, strategy, loss_sum, eval_batch)
        log.epoch({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_accuracy": val_accuracy,
                   "lr": plan.lr_at(first_step + plan.updates_per_epoch - 1),  # the epoch's last
                   "epoch_seconds": epoch_seconds,
                   "val_seconds": time.perf_counter() - start - epoch_seconds,
                   "samples_per_second": plan.samples_per_epoch / epoch_seconds})
    train_seconds = time.perf_counter() - loop_start

    test_loss, test_accuracy = evaluate(model, samples, split.test, strategy, loss_sum, eval_batch)
    memory = strategy.memory_report(model, optimizer)
    state = strategy.full_state_dict(model)
    return {"train_seconds": train_seconds, "train_loss": train_loss, "val_loss": val_loss,
            "val_accuracy": val_accuracy, "test_loss": test_loss, "test_accuracy": test_accuracy,
            "memory": memory, "state_dict": state}
