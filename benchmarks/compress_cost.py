"""What a compressed gradient sum costs to compute, apart from the bytes it sends.

    python benchmarks/compress_cost.py [--widths 16,16:256,256:1024,1024:4096,4096]
                                       [--repeats 20] [--json compress_cost.json]

One process, a 1-rank gloo group, one thread: DDP with each of dptrain's comm hooks
(distributed/gradsum.py: the plain sum, fp16 and bf16, PowerSGD at ranks 1, 2 and 4 after its
warm-up), each timed from the hook's call until its future is done, so that the all_reduce
inside costs nothing (one rank) and what is left is the cast, or PowerSGD's products and
orthogonalizations, and their Python. The hook is wrapped, hook in, hook out, as anything that
observes the sum does. Also local SGD's parameter average (torch's average_parameters: a flat
copy, the divide, the scatter back). Per width and method: seconds per update (median of
--repeats, after warm-up), the bytes that would cross the link, and the compression ratio.
The study's cost model (cost_model.py --knobs) reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.components.model import MLP  # noqa: E402
from dptrain.config import DDPConfig  # noqa: E402
from dptrain.distributed import gradsum  # noqa: E402
from dptrain.distributed.strategy import DistEnv  # noqa: E402

METHODS = {"sum": "none", "fp16": "fp16", "bf16": "bf16", "powersgd:1": "powersgd:1",
           "powersgd:2": "powersgd:2", "powersgd:4": "powersgd:4"}
BATCH = 64  # samples per backward: the hook's cost does not depend on it


def _timed(hook, seconds: list[float]):
    def timed_hook(state, bucket):
        start = time.perf_counter()
        future = hook(state, bucket)
        future.wait()
        seconds.append(time.perf_counter() - start)
        return future

    return timed_hook


def hook_seconds(hidden: tuple[int, ...], compress: str, repeats: int) -> float:
    """Median seconds the hook of `compress` takes per update (all buckets) on one rank."""
    torch.manual_seed(0)
    model = MLP(hidden, "relu", "cross_entropy")
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    knobs = DDPConfig(grad_compress=compress, powersgd_warmup=2)
    state, hook = gradsum.comm_hook("collective", knobs, list(model.parameters()), DistEnv(),
                                    60.0)
    seconds: list[float] = []
    ddp.register_comm_hook(state, _timed(hook, seconds))
    x = torch.randint(0, 256, (BATCH, 784), dtype=torch.uint8)
    y = torch.randint(0, 10, (BATCH,))
    per_update = []
    for i in range(4 + repeats):  # 2 warm-up sums, the first compressed one, one more
        seconds.clear()
        ddp(x, y).backward()
        if i >= 4:
            per_update.append(sum(seconds))
    return statistics.median(per_update)


def average_seconds(hidden: tuple[int, ...], repeats: int) -> float:
    """Median seconds of one local-SGD parameter average (torch's, one rank)."""
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    model = MLP(hidden, "relu", "cross_entropy")
    times = []
    for _ in range(2 + repeats):
        start = time.perf_counter()
        average_parameters(iter(model.parameters()), dist.group.WORLD)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def wire_bytes(hidden: tuple[int, ...], compress: str) -> int:
    """Bytes of one rank's contribution to the sum (what an all-reduce moves, before its
    2(n-1)/n factor)."""
    shapes = [p.shape for p in MLP(hidden).parameters()]
    kind, rank = gradsum.parse_grad_compress(compress)
    numel = sum(s.numel() for s in shapes)
    if kind in ("fp16", "bf16"):
        return 2 * numel
    if kind != "powersgd":
        return 4 * numel
    sizes = gradsum.piece_sizes(shapes, rank)
    uncompressed = sum(e for e, p in zip(sizes["error"], sizes["p"]) if p == 0)
    return 4 * (uncompressed + sum(sizes["p"]) + sum(sizes["q"]))


def measure(widths: list[tuple[int, ...]], repeats: int) -> list[dict]:
    rows = []
    for hidden in widths:
        numel = sum(p.numel() for p in MLP(hidden).parameters())
        row = {"hidden": list(hidden), "params": numel, "methods": {}}
        for name, compress in METHODS.items():
            seconds = hook_seconds(hidden, compress, repeats)
            bytes_ = wire_bytes(hidden, compress)
            row["methods"][name] = {"seconds": seconds, "wire_bytes": bytes_,
                                    "ratio": 4 * numel / bytes_}
        row["average_seconds"] = average_seconds(hidden, repeats)
        plain = row["methods"]["sum"]["seconds"]
        for method in row["methods"].values():  # what compressing adds to the plain sum
            method["overhead_seconds"] = max(0.0, method["seconds"] - plain)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="16,16:256,256:1024,1024:4096,4096")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    widths = [tuple(int(h) for h in w.split(",")) for w in args.widths.split(":")]
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    started = time.time()
    try:
        rows = measure(widths, args.repeats)
    finally:
        dist.destroy_process_group()
    print(f"compress_cost: {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, "
          f"1 rank, median of {args.repeats} updates ({time.time() - started:.0f} s)")
    print(f"{'hidden':>10} {'params':>10}  " + "  ".join(f"{m:>16}" for m in METHODS)
          + "  average   (ms per update; compression ratio)")
    for r in rows:
        cells = [f"{1e3 * m['seconds']:8.3f} {m['ratio']:6.1f}x" for m in r["methods"].values()]
        print(f"{','.join(map(str, r['hidden'])):>10} {r['params']:>10}  " + "  ".join(cells)
              + f"  {1e3 * r['average_seconds']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"cores": os.cpu_count(), "torch": torch.__version__,
                                         "repeats": args.repeats, "rows": rows}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
