"""What --precision bf16 costs or saves on this CPU: the training step of `dptrain seq` at fp32
and at bf16 (torch.autocast), timed alternately, across model widths and batches.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/precision.py [--rounds 5]

Each case runs dptrain's own step (components/step.py: the fused loss under autocast, backward,
FusedAdam) on hidden layers (W, W) and batches of B real MNIST samples, in three variants:
fp32, bf16 with the fused loss (what `--precision bf16` runs), and bf16 through the layers'
own autograd (the fused loss switched off), which tells whether the fused node still pays
under autocast. Variants alternate within each round, in a rotating order, so that drift of
the machine hits all alike; each measurement times whole steps for at least --min-seconds,
after two warm-up steps, and reports that step time x the epoch's updates (42,000 // B).
Medians of --rounds.

bf16 products need the CPU's support to pay: avx512_bf16 (dot products of bf16 pairs) or
amx_bf16 (tile multiplies); without either, oneDNN converts to float32 and bf16 only adds the
conversions. The flags found are printed first. Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dptrain.components.data import epoch_order, load_mnist, split_indices
from dptrain.components.model import MLP
from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
from dptrain.config import OptimConfig, cpu_cores
from dptrain.distributed.strategy import DistEnv, Strategy
from dptrain.train import Samples, global_batches

N_TRAIN = 42_000  # the train split
VARIANTS = {"fp32": ("fp32", True), "bf16": ("bf16", True), "bf16 layers": ("bf16", False)}


def cpu_flags() -> str:
    """The bf16 features of this CPU, from /proc/cpuinfo (lscpu's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(found) or "none of avx512f, avx512_bf16, amx_bf16"


def step_seconds(hidden: tuple[int, ...], batch: int, variant: str, samples: Samples, order,
                 min_seconds: float) -> float:
    """Wall seconds of one training step of `variant`: the mean over as many whole steps as
    fill `min_seconds` (at least 3), after two warm-up steps."""
    precision, fused = VARIANTS[variant]
    strategy = Strategy(DistEnv(), torch.device("cpu"))
    torch.manual_seed(0)
    model = strategy.wrap(MLP(hidden), precision=precision)
    model.fused = fused
    guard = NonFiniteGuard(strategy.device)
    optimizer = make_optimizer(OptimConfig(), model.parameters(), 0.01, skip_if=guard.flag)
    step = make_step(strategy, model, optimizer, samples, guard, precision=precision)
    batches = list(global_batches(order[:N_TRAIN // batch * batch], batch))
    step.begin_epoch(len(batches))
    steps = 0

    def one() -> None:
        nonlocal steps
        step(steps % len(batches), batches[steps % len(batches)], batch, 0.01)
        steps += 1

    one(), one()
    start, steps_before = time.perf_counter(), steps
    while steps - steps_before < 3 or time.perf_counter() - start < min_seconds:
        one()
    return (time.perf_counter() - start) / (steps - steps_before)


def measure(widths: list[int], batches: list[int], rounds: int, min_seconds: float) -> list[dict]:
    mnist = load_mnist("")
    samples = Samples(mnist, torch.device("cpu"))
    order = samples.rows(epoch_order(split_indices(len(mnist.labels), 0).train, 0, 1))
    names, rows = list(VARIANTS), []
    for width in widths:
        for batch in batches:
            times = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(step_seconds((width, width), batch, name, samples, order,
                                                    min_seconds))
            epoch = {name: statistics.median(t) * (N_TRAIN // batch) for name, t in times.items()}
            rows.append({"width": width, "batch": batch, **epoch})
            print(f"  W {width:5d}  B {batch:5d}  " + "  ".join(
                f"{name} {seconds:8.3f} s" for name, seconds in epoch.items())
                + f"  bf16/fp32 {epoch['bf16'] / epoch['fp32']:5.2f}"
                + f"  bf16 layers/bf16 {epoch['bf16 layers'] / epoch['bf16']:5.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,256,1024")
    parser.add_argument("--batches", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="time whole steps for at least this long per measurement")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{platform.processor() or platform.machine()}, {cpu_cores()} cores, CPU bf16 "
          f"features: {cpu_flags()}; torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} thread(s); load average "
          f"{os.getloadavg()[0]:.2f} at the start; medians of {args.rounds} alternating rounds; "
          "seconds per epoch of 42,000 samples")
    measure([int(w) for w in args.widths.split(",")], [int(b) for b in args.batches.split(",")],
            args.rounds, args.min_seconds)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} at the end (1-minute; {load[1]:.2f} over 5 minutes)")


if __name__ == "__main__":
    main()
