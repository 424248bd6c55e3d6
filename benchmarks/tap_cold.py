"""What one squared-norm read of a 13k-float gradient costs when it is cold, as the noise tap's
reads are in a run (a few forward/backward passes of the default model between them), against
the same read in a warm loop.

    python benchmarks/tap_cold.py [--rounds 300]

A read of the default model's gradient takes ~2.6 us in a warm loop but about 12 us inside a
ddp x 2 run of the default model (the tap's vector_norm(out=) timed in place): most of a cold
read is per operation (the dispatcher's and the reduction's code paths), not per byte. This prints the median cold and warm time of each way to
get the number, one thread, on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dptrain.components.model import MLP

    model = MLP((16, 16), "relu", "cross_entropy")
    x, y = torch.rand(512, 784), torch.randint(0, 10, (512,))
    gradient = torch.randn(13002)  # the default model's parameters
    store = torch.empty(64)
    array = gradient.numpy()
    ways = {
        "torch.linalg.vector_norm(out=store[i]) (the tap's)":
            lambda: torch.linalg.vector_norm(gradient, out=store[3]),
        "torch.linalg.vector_norm, a new tensor": lambda: torch.linalg.vector_norm(gradient),
        "store[i] = torch.linalg.vector_norm(...)":
            lambda: store.__setitem__(5, torch.linalg.vector_norm(gradient)),
        "store[i] = torch.vdot(...)": lambda: store.__setitem__(6, torch.vdot(gradient, gradient)),
        "torch.dot(out=store[i])": lambda: torch.dot(gradient, gradient, out=store[4]),
        "torch.vdot, a new tensor": lambda: torch.vdot(gradient, gradient),
        "np.dot of tensor.numpy()": lambda: float(np.dot(gradient.numpy(), gradient.numpy())),
        "np.dot of a numpy view made once": lambda: float(np.dot(array, array)),
        "nothing (the timer)": lambda: None,
    }

    def steps() -> None:  # what runs between two reads of a run at --noise-every 4
        for _ in range(4):
            model.zero_grad()
            model(x, y).backward()

    cold = {name: [] for name in ways}
    warm = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, read in ways.items():
            steps()
            start = time.perf_counter()
            read()
            cold[name].append(time.perf_counter() - start)
            for _ in range(3):  # then again at once: warm
                start = time.perf_counter()
                read()
                warm[name].append(time.perf_counter() - start)
    print(f"{'read':55} {'cold us':>8} {'warm us':>8}")
    for name in ways:
        print(f"{name:55} {statistics.median(cold[name]) * 1e6:8.1f} "
              f"{statistics.median(warm[name]) * 1e6:8.1f}")


if __name__ == "__main__":
    main()
