"""The floor of this training step on a GPU: the same model, batch and Adam, written by hand.

    DPTRAIN_DATA_DIR=... python benchmarks/gpu_floor.py [--device cuda] [--epochs 25] [--json f]

Two loops over the 42,000 training rows (batch 1024, the tail dropped), data already on the
device, nothing read back by the host inside an epoch:
  eager   a random permutation on the device, x[idx], F.cross_entropy, fused Adam;
  graph   the same step captured once with torch.cuda.graph and replayed for each batch, the
          batch's indices copied into a static buffer (CUDA only).
Prints the median seconds per epoch of each (the first epoch, a warm-up, is not counted) and
writes them to --json. `dptrain seq --device cuda` is judged against the graph loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.components.data import load_mnist, split_indices

BATCH = 1024


def setup(device: torch.device):
    """The model, a capturable fused Adam, and the train split's pixels and labels on device."""
    mnist = load_mnist()
    train = torch.from_numpy(split_indices(len(mnist.labels), 0).train)
    images = torch.from_numpy(mnist.images)[train].to(device).float().div_(255)
    labels = torch.from_numpy(mnist.labels)[train].to(device=device, dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 10)).to(device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True, capturable=cuda)
    return model, optimizer, images, labels


def step(model, optimizer, images, labels, index) -> torch.Tensor:
    loss = F.cross_entropy(model(images[index]), labels[index])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # the graph's gradient buffers stay in place
    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epochs(device: torch.device, epochs: int, n: int, update) -> list[float]:
    """Seconds of each epoch after a warm-up one: a permutation on the device, then
    `update(batch_rows)` per batch, the device synchronized only around the epoch."""
    seconds = []
    for _ in range(epochs + 1):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(n, device=device)
        for k in range(n // BATCH):
            update(order[k * BATCH:(k + 1) * BATCH])
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def eager_epochs(device: torch.device, epochs: int) -> list[float]:
    model, optimizer, images, labels = setup(device)
    return timed_epochs(device, epochs, len(labels),
                        lambda rows: step(model, optimizer, images, labels, rows))


def graph_epochs(device: torch.device, epochs: int) -> list[float]:
    model, optimizer, images, labels = setup(device)
    index = torch.arange(BATCH, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        for _ in range(3):
            step(model, optimizer, images, labels, index)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, optimizer, images, labels, index)

    def replay(rows: torch.Tensor) -> None:
        index.copy_(rows)
        graph.replay()

    return timed_epochs(device, epochs, len(labels), replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    results = {"device": str(device), "torch": torch.__version__,
               "eager": eager_epochs(device, args.epochs)}
    if device.type == "cuda":
        results["graph"] = graph_epochs(device, args.epochs)
        results["gpu"] = torch.cuda.get_device_name(device)
    for name in ("eager", "graph"):
        if name in results:
            print(f"{name} loop: {statistics.median(results[name]):.5f} s per epoch "
                  f"(median of {args.epochs})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
