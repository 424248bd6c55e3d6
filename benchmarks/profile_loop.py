"""Where a `seq` training step spends its time, on one thread.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/profile_loop.py [--epochs 5] [--ops]
    DPTRAIN_DATA_DIR=../shared/data/mnist torchrun --standalone --nproc-per-node 2 \
        benchmarks/profile_loop.py --mode ddp          # the same, on rank 0 of a ddp run

Runs the loop's step (the same calls as dptrain.train.train_epoch) with a timer around each
phase, and reports per-epoch milliseconds next to the GEMM floor of bench.py. Times are this
thread's CPU time, which other processes on a busy machine disturb less than wall time.
--ops adds torch.profiler's table of the most expensive operators for one epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from bench import gemm_floor, pixel_floor
from dptrain.config import Config, SystemConfig, resolve
from dptrain.components.data import epoch_order, load_mnist, split_indices
from dptrain.components.model import MLP
from dptrain.distributed.strategy import DistEnv, make_strategy
from dptrain.components.step import NonFiniteGuard, make_optimizer
from dptrain.train import Samples, global_batches, rank_slice


def profile_epoch(model, optimizer, guard, samples, order, plan, strategy) -> dict[str, float]:
    """One epoch of the eager step (step.EagerStep), phase by phase; CPU seconds per phase."""
    spent: dict[str, float] = defaultdict(float)
    clock = time.thread_time
    record = torch.zeros(plan.updates_per_epoch, 2)  # [loss, flag] per update, as the step keeps
    guard.reset()
    batches = global_batches(samples.rows(order[:plan.samples_per_epoch]), plan.global_batch)
    for index, rows in enumerate(batches):
        t0 = clock()
        x, y = samples.batch(rank_slice(rows, strategy))
        t1 = clock()
        loss = model(x, y)
        t2 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(loss.detach() * 0.0 + 1 / len(rows))
        t4 = clock()
        guard.check(strategy.local_gradients(model))
        t5 = clock()
        optimizer.step()
        torch.stack((loss.detach(), guard.flag), out=record[index])
        t6 = clock()
        for phase, seconds in (("batch (gather uint8 rows)", t1 - t0),
                               ("forward and loss", t2 - t1), ("backward", t4 - t2),
                               ("finite-gradient check", t5 - t4), ("optimizer, loss record", t6 - t5)):
            spent[phase] += seconds
    if guard.flag.item():
        raise RuntimeError("non-finite gradients")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's table")
    parser.add_argument("--mode", default="seq", choices=("seq", "ddp", "fsdp"),
                        help="ddp/fsdp: run under torchrun")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = Config()
    mnist = load_mnist("")
    split = split_indices(len(mnist.labels), config.data.split_seed)
    env = DistEnv.from_environ()
    plan = resolve(config, mode=args.mode, world_size=env.world_size, n_train=len(split.train))
    strategy = make_strategy(args.mode, env, SystemConfig(device="cpu"))
    torch.manual_seed(config.train.seed)
    model = strategy.wrap(MLP(config.model.hidden, config.model.activation, config.train.loss))
    guard = NonFiniteGuard(strategy.device)
    optimizer = make_optimizer(config.optim, model.parameters(), plan.lr, skip_if=guard.flag)
    samples = Samples(mnist, strategy.device)

    epochs = []
    for epoch in range(args.epochs + 1):  # the first epoch warms up, and is not counted
        order = epoch_order(split.train, config.train.seed, epoch + 1)
        spent = profile_epoch(model, optimizer, guard, samples, order, plan, strategy)
        if epoch:
            epochs.append(spent)
    phases = {name: statistics.median(e[name] for e in epochs) for name in epochs[0]}
    total = sum(phases.values())
    floor = gemm_floor(plan.updates_per_epoch, plan.global_batch, clock=time.thread_time)
    pixels = pixel_floor(plan.updates_per_epoch, plan.global_batch, samples.images,
                         clock=time.thread_time)
    strategy.close()
    if not env.is_main:
        return
    print(f"{args.mode} x {env.world_size}: {plan.updates_per_epoch} steps of "
          f"{plan.global_batch} samples; medians of {args.epochs} epochs, rank 0's CPU ms per "
          "epoch, 1 thread")
    for name, seconds in phases.items():
        print(f"  {name:28s} {seconds * 1e3:7.1f}  {seconds / total:5.0%}")
    print(f"  {'total':28s} {total * 1e3:7.1f}")
    print(f"  GEMM floor (products only)   {floor * 1e3:7.1f}  -> loop / floor = {total / floor:.2f}")
    print(f"  pixel gather + widen floor   {pixels * 1e3:7.1f}  -> "
          f"(floor + pixels) / floor = {(floor + pixels) / floor:.2f}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        order = epoch_order(split.train, config.train.seed, 99)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profile_epoch(model, optimizer, guard, samples, order, plan, strategy)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
