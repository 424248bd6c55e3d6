"""Where a second intra-op thread starts to pay: seq epoch time at 1 and 2 threads, across
model widths and per-rank batches.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/threads.py [--rounds 3]

Each case is the training step of `dptrain seq` (dptrain.train.train_epoch's calls: the fused
loss, backward, FusedAdam) on hidden layers (W, W) and a batch of B real MNIST samples, timed
at 1 and 2 threads alternately (--rounds times each, medians, wall time). A whole epoch at the
large widths would take minutes, so each case times whole steps for at least --min-seconds and
reports that step time x the epoch's updates (42,000 // B). The work of a step is B times the
multiply-adds of one sample's forward pass (784*W + W*W + W*10): the quantity
dptrain.config.THREAD_MIN_WORK is stated in. The closing line gives the crossover: the work
above which 2 threads were at least --gain times faster in every case measured.

Timings need a quiet machine: a second thread on a core that another process keeps busy makes
a step many times slower. The load average is printed with the table for that reason.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from dptrain.config import THREAD_MIN_WORK, cpu_cores, step_work
from dptrain.components.data import load_mnist, split_indices
from dptrain.components.model import MLP
from dptrain.components.optim import FusedAdam
from dptrain.train import Samples

N_TRAIN = 42_000  # the train split


def step_seconds(hidden: tuple[int, ...], batch: int, threads: int, samples: Samples,
                 train_rows, min_seconds: float) -> float:
    """Wall seconds of one training step at `threads` intra-op threads: the mean over as many
    whole steps as fill `min_seconds` (at least 3), after two warm-up steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MLP(hidden)
    optimizer = FusedAdam(model.parameters(), lr=0.01)
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        rows = train_rows[torch.randint(len(train_rows), (batch,), generator=rng).numpy()]
        x, y = samples.batch(samples.rows(rows))
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        (loss / batch).backward()
        optimizer.step()

    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < min_seconds:
        step()
        steps += 1
    return (time.perf_counter() - start) / steps


def measure(widths: list[int], batches: list[int], rounds: int, min_seconds: float,
            max_work: float) -> list[dict]:
    """One row per (width, batch) whose step work is at most `max_work` multiply-adds."""
    mnist = load_mnist("")
    samples = Samples(mnist, torch.device("cpu"))
    train_rows = split_indices(len(mnist.labels), 0).train
    rows = []
    for width in widths:
        for batch in batches:
            hidden = (width, width)
            work = step_work(hidden, batch)
            if work > max_work:
                continue
            times = {1: [], 2: []}
            for r in range(rounds):  # alternate, so that drift of the machine hits both alike
                for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
                    times[threads].append(step_seconds(hidden, batch, threads, samples,
                                                       train_rows, min_seconds))
            one, two = (statistics.median(times[t]) for t in (1, 2))
            updates = N_TRAIN // batch
            rows.append({"width": width, "batch": batch, "work": work,
                         "epoch_1": one * updates, "epoch_2": two * updates, "gain": one / two})
            print(f"  W {width:5d}  B {batch:5d}  work {work:10.3g}  1 thread {one * updates:8.3f} s"
                  f"  2 threads {two * updates:8.3f} s  gain {one / two:5.2f}", flush=True)
    return rows


def crossover(rows: list[dict], gain: float) -> float | None:
    """The work above which every case gained at least `gain`: the geometric middle between
    the largest work that did not and the smallest above it that did; None if none gained."""
    ordered = sorted(rows, key=lambda r: r["work"])
    losers = [r["work"] for r in ordered if r["gain"] < gain]
    above = [r["work"] for r in ordered if r["work"] > max(losers, default=0)]
    if not above:
        return None
    if not losers:
        return above[0]
    return math.sqrt(max(losers) * above[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,64,256,1024,4096")
    parser.add_argument("--batches", default="64,256,1024,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.2,
                        help="time whole steps for at least this long per measurement")
    parser.add_argument("--max-work", type=float, default=6e9,
                        help="skip cases whose step is more multiply-adds than this")
    parser.add_argument("--gain", type=float, default=1.2,
                        help="how much faster 2 threads must be to count as paying")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    load_before = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {cpu_cores()} cores, torch "
          f"{torch.__version__}; load average {load_before[0]:.2f} at the start; medians of "
          f"{args.rounds} alternating rounds; seconds per epoch of 42,000 samples")
    rows = measure(widths, batches, args.rounds, args.min_seconds, args.max_work)
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.2f} at the end (1-minute; "
          f"{load_after[1]:.2f} over 5 minutes)")
    found = crossover(rows, args.gain)
    if found is None:
        print(f"crossover: 2 threads were never {args.gain}x faster; 1 thread throughout")
    else:
        print(f"crossover: 2 threads are at least {args.gain}x faster from about {found:.3g} "
              f"multiply-adds per rank per step (THREAD_MIN_WORK is now {THREAD_MIN_WORK:.3g})")


if __name__ == "__main__":
    main()
