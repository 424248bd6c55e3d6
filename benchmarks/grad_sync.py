"""How long one gradient sum takes, by method, across model sizes and process counts (one node).

    python benchmarks/grad_sync.py [--nproc 2,3,4] [--sizes 13002,269322,1863690,20037642]
                                   [--repeats 9] [--json grad_sync.json]

The default sizes are the parameter counts of hidden 16,16 / 256,256 / 1024,1024 / 4096,4096.
Methods, timed in turn on the same ranks (one thread each): --repeats sums back to back, three
times; the median of the three of the slowest rank:
  collective   gloo's all_reduce (what `--grad-sync collective` uses)
  shm          SharedMemorySum as dptrain ships it (ALL_READ_BELOW decides per round)
  shm all-read every rank adds every slot (the pre-study design, in bounded rounds)
  shm rs+ag    each rank adds its 1/N share, then all copy the result (reduce-scatter + all-gather)
Prints ms per sum and the bytes per second of the gradient (size x 4 / time); the study's
section 2 reads which method wins where (docs/STUDY.md).
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
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.distributed.shm_sum import SharedMemorySum  # noqa: E402

METHODS = ("collective", "shm", "shm all-read", "shm rs+ag")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summers(size: int, rank: int, world_size: int) -> dict:
    """One SharedMemorySum per shared-memory method, created on every rank together."""
    never, always = 1 << 62, 0
    return {"shm": SharedMemorySum(size, rank, world_size, 60.0),
            "shm all-read": SharedMemorySum(size, rank, world_size, 60.0, all_read_below=never),
            "shm rs+ag": SharedMemorySum(size, rank, world_size, 60.0, all_read_below=always)}


def _time_calls(method: str, summers: dict, tensor: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per sum on this rank, in 3 rounds of `repeats` back-to-back sums (as in
    training, where the ranks stay in step), after one warm-up call."""
    def one() -> None:
        if method == "collective":
            dist.all_reduce(tensor)
        else:
            summers[method].sum_(tensor)

    one()
    seconds = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            one()
        seconds.append((time.perf_counter() - start) / repeats)
    return seconds


def _rank(rank: int, world_size: int, port: int, sizes: list[int], repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for size in sizes:
        summers = _summers(size, rank, world_size)
        tensor = torch.randn(size)
        for method in METHODS:
            seconds = _time_calls(method, summers, tensor, repeats)
            gathered = [None] * world_size
            dist.all_gather_object(gathered, seconds)
            slowest = [max(rounds) for rounds in zip(*gathered)]  # a sum ends for the last rank
            results[(size, method)] = statistics.median(slowest)
        del summers
    if rank == 0:
        out.update({f"{size}|{method}": s for (size, method), s in results.items()})
    dist.destroy_process_group()


def measure(nprocs: list[int], sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    with mp.Manager() as manager:
        for n in nprocs:
            out = manager.dict()
            mp.spawn(_rank, args=(n, _free_port(), sizes, repeats, out), nprocs=n)
            for size in sizes:
                times = {m: out[f"{size}|{m}"] for m in METHODS}
                rows.append({"nproc": n, "size": size, "mb": 4 * size / 1e6,
                             "seconds": times, "fastest": min(times, key=times.get)})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'nproc':>5} {'params':>10} {'MB':>7}  " + "  ".join(f"{m:>13}" for m in METHODS)
          + "  fastest   (ms per sum; GB/s of gradient)")
    for r in rows:
        cells = [f"{1e3 * s:7.3f} {r['mb'] / 1e3 / s:5.2f}" for s in r["seconds"].values()]
        print(f"{r['nproc']:>5} {r['size']:>10} {r['mb']:>7.2f}  " + "  ".join(cells)
              + f"  {r['fastest']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", default="2,3,4")
    parser.add_argument("--sizes", default="13002,269322,1863690,20037642")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.time()
    rows = measure([int(n) for n in args.nproc.split(",")],
                   [int(s) for s in args.sizes.split(",")], args.repeats)
    print(f"grad_sync: {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per rank, "
          f"{args.repeats} sums x 3, median ({time.time() - started:.0f} s)")
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps({"cores": os.cpu_count(), "torch": torch.__version__,
                                         "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
