"""The harness for bigger machines: ddp over more CPU cores, and the CUDA path.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/scale.py \\
        [--nproc 1,2,4,8,16] [--cuda] [--repeats 3] [--epochs 25] [--json scale.json]

Cases, all with the default config (global batch 1024, so every run makes the same updates),
one thread per process, interleaved over --repeats rounds in a rotated order:
  seq             `dptrain seq` on one CPU thread: the baseline every speed-up is against
  ddp-N           `dptrain ddp --nproc N` on gloo CPU ranks (gradients summed in shared memory)
  ddp-N gloo      the same, with --grad-sync collective (gloo's all_reduce)
  with --cuda:    `dptrain seq`, `ddp --nproc 1` (nccl) and `fsdp --nproc 1` on the GPU
Prints medians, speed-up and parallel efficiency (seq train seconds / (N x train seconds)),
and writes every sample and the machine to --json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import MB, machine, train_run


def cases(nprocs: list[int], cuda: bool, work: Path, epochs: int) -> dict:
    """name -> (nproc, a function making one run)."""
    runs = {"seq": (1, lambda: train_run("seq", work, epochs))}
    for n in nprocs:
        runs[f"ddp-{n}"] = (n, lambda n=n: train_run("ddp", work, epochs, nproc=n))
        if n > 1:
            runs[f"ddp-{n} gloo"] = (n, lambda n=n: train_run("ddp", work, epochs, "--grad-sync",
                                                              "collective", nproc=n))
    if cuda:
        for mode in ("seq", "ddp", "fsdp"):
            runs[f"cuda {mode}"] = (1, lambda mode=mode: train_run(mode, work, epochs, nproc=1,
                                                                   device="cuda"))
    return runs


def median(values) -> float:
    return statistics.median(list(values))


def summarize(samples: dict[str, list], sizes: dict[str, int]) -> list[dict]:
    seq_train = median(r["train_seconds"] for r in samples["seq"])  # the CPU baseline
    rows = []
    for name, runs in samples.items():
        if not runs:
            continue
        train = median(r["train_seconds"] for r in runs)
        speedup = seq_train / train
        gpu = [max(r["memory"]["peak_gpu_bytes"]) for r in runs if "peak_gpu_bytes" in r["memory"]]
        rows.append({
            "case": name, "nproc": sizes[name],
            "epoch_s": median(median(r["epoch_seconds"]) for r in runs),
            "train_s": train, "wall_s": median(r["wall_seconds"] for r in runs),
            "startup_s": median(r["wall_seconds"] - r["train_seconds"] for r in runs),
            "speedup": speedup,
            # Efficiency counts CPU ranks; a GPU run's speed-up is against one CPU thread.
            "efficiency": speedup / sizes[name] if not name.startswith("cuda") else None,
            "test_accuracy": median(r["test_accuracy"] for r in runs),
            "peak_rss_mb": median(max(r["memory"]["peak_rss_bytes"]) for r in runs) / MB,
            "peak_gpu_mb": median(gpu) / MB if gpu else None,
        })
    return rows


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    mc = report["machine"]
    console = Console(width=max(Console().width, 120))
    gpu = f", {mc['gpu']}" if mc.get("gpu") else ""
    console.print(f"[bold]dptrain scaling[/]: {mc['cpu']}, {mc['cores']} cores{gpu}, torch "
                  f"{mc['torch']}, 1 thread per process; medians of {report['repeats']} "
                  f"interleaved rounds of {report['epochs']} epochs ({report['seconds']:.0f} s)")
    table = Table()
    columns = ("case", "epoch s", "train s", "wall s", "wall-train", "speed-up", "efficiency",
               "test acc", "worker RSS MB", "GPU MB")
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in report["rows"]:
        table.add_row(r["case"], f"{r['epoch_s']:.4f}", f"{r['train_s']:.2f}", f"{r['wall_s']:.2f}",
                      f"{r['startup_s']:.2f}", f"{r['speedup']:.2f}",
                      "-" if r["efficiency"] is None else f"{r['efficiency']:.0%}",
                      f"{r['test_accuracy']:.4f}", f"{r['peak_rss_mb']:.0f}",
                      "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="1,2,4,8,16", help="ddp process counts")
    parser.add_argument("--cuda", action="store_true", help="also run seq, ddp and fsdp on the GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--json", default="scale.json", help="where to write all measurements")
    args = parser.parse_args()
    nprocs = [int(n) for n in args.nproc.split(",")]
    if args.cuda and not torch.cuda.is_available():
        sys.exit("--cuda, but CUDA is not available on this machine")

    work = Path(tempfile.mkdtemp(prefix="dptrain-scale-"))
    runs = cases(nprocs, args.cuda, work, args.epochs)
    samples: dict[str, list] = {name: [] for name in runs}
    failed: dict[str, str] = {}
    info = machine()
    if args.cuda:
        info["gpu"] = torch.cuda.get_device_name()
    started = time.time()
    for round_ in range(args.repeats):
        names = list(runs)
        names = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in (n for n in names if n not in failed):
            print(f"round {round_ + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            try:
                samples[name].append(runs[name][1]())
            except SystemExit as e:  # train_run's report of a failed run: drop the case
                print(f"{name} failed; dropped: {e}", file=sys.stderr, flush=True)
                failed[name] = str(e)
        # After every round, so that a run cut short still leaves what it measured.
        report = {"machine": info, "repeats": round_ + 1, "epochs": args.epochs,
                  "seconds": time.time() - started,
                  "rows": summarize(samples, {name: n for name, (n, _) in runs.items()}),
                  "samples": samples, "failed": failed}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
