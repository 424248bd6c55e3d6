"""The operations of one seq training step, timed one by one (wall us per step, 1 thread).

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/step_ops.py [--epochs 8]

The same operations, in the same order, as the fused training loss (dptrain.components.model), its
backward and FusedAdam, on the default model, the real data order and batch; written out flat
without autograd, so that each can be timed in place: after the others, with the caches as a
real step leaves them. The medians over all steps after a warm-up epoch, and their sum.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from dptrain.config import Config, resolve
from dptrain.components.data import epoch_order, load_mnist, split_indices
from dptrain.components.model import MLP
from dptrain.components.optim import FusedAdam
from dptrain.train import global_batches


def timed_step(rows, images, labels, params, optimizer, spent: dict[str, list]) -> None:
    w1, b1, w2, b2, w3, b3 = (p.detach() for p in params)
    marks = [("", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    index = torch.from_numpy(rows)
    x = images.index_select(0, index)
    mark("gather pixels")
    y = labels.index_select(0, index)
    mark("gather labels")
    xf = x.to(torch.float32)
    mark("widen pixels")
    h1 = torch.addmm(b1, xf, (w1 * (1 / 255)).t()).relu_()
    mark("layer 1 forward (784 -> 16)")
    h2 = torch.addmm(b2, h1, w2.t()).relu_()
    z = torch.addmm(b3, h2, w3.t())
    mark("layers 2, 3 forward")
    log_probs = torch.log_softmax(z.t().contiguous(), 0)
    loss = -log_probs.gather(0, y.unsqueeze(0)).sum()
    g = log_probs.exp()
    g.scatter_(0, y.unsqueeze(0), -1.0, reduce="add").mul_(1 / len(y))
    mark("loss and its gradient")
    grads = [g.mm(h2), g.sum(1)]
    gh = torch.ops.aten.threshold_backward(g.t().mm(w3), h2, 0)
    grads[:0] = [gh.t().mm(h1), gh.sum(0)]
    gh = torch.ops.aten.threshold_backward(gh.mm(w2), h1, 0)
    mark("layers 3, 2 backward")
    grads[:0] = [gh.t().mm(xf).mul_(1 / 255), gh.sum(0)]
    mark("layer 1 weight gradient")
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    mark("Adam step")
    optimizer.zero_grad(set_to_none=True)
    mark("zero_grad")
    for (_, start), (name, end) in zip(marks, marks[1:]):
        spent[name].append(end - start)
    del loss


def measure(epochs: int) -> tuple[dict[str, float], int]:
    """Median seconds of each operation group per step, and the steps per epoch."""
    torch.set_num_threads(1)
    config = Config()
    mnist = load_mnist("")
    split = split_indices(len(mnist.labels), config.data.split_seed)
    plan = resolve(config, mode="seq", world_size=1, n_train=len(split.train))
    images = torch.from_numpy(mnist.images)
    labels = torch.from_numpy(mnist.labels).to(torch.int64)
    torch.manual_seed(config.train.seed)
    params = list(MLP().parameters())
    optimizer = FusedAdam(params, lr=plan.lr)
    spent: dict[str, list] = defaultdict(list)
    for epoch in range(1, epochs + 2):  # the first epoch warms up
        if epoch == 2:
            spent.clear()
        order = epoch_order(split.train, config.train.seed, epoch)[:plan.samples_per_epoch]
        for rows in global_batches(order, plan.global_batch):
            timed_step(rows, images, labels, params, optimizer, spent)
    return {name: statistics.median(s) for name, s in spent.items()}, plan.updates_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    medians, steps = measure(args.epochs)
    print(f"one seq step, {Config().train.batch_size} samples, medians of {args.epochs} epochs "
          f"x {steps} steps, wall us")
    for name, seconds in medians.items():
        print(f"  {name:28s} {seconds * 1e6:7.1f}")
    total = sum(medians.values())
    print(f"  {'sum':28s} {total * 1e6:7.1f}  = {total * steps * 1e3:.1f} ms per epoch")


if __name__ == "__main__":
    main()
