"""The benchmark harness: how close the training loop runs to the machine's limits.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/bench.py [--repeats 3] [--json bench.json]

Every case runs --repeats times, interleaved (each round runs every case once, in a rotated
order), so that drift of a shared machine hits all of them; the table shows medians and the
ratios the performance targets are stated in. CPU only, one thread per process:
  a  GEMM floor: the bare matrix products of one training epoch, in this process; beside it the
     eager-step floor: every operation of a step written out flat (step_ops.py), no autograd
  b  `dptrain seq` (default config, 25 epochs)
  c  the tutorial baseline (benchmarks/tutorial_baseline.py; better of 0 and 2 loader workers,
     --loader-workers)
  d  `dptrain ddp --nproc 2`, against b
  e  start-up: wall - train seconds of b and d, against a bare `python -c "import torch"`
  f  peak resident memory of every worker, against that bare import
  g  `dptrain fsdp --nproc 2`: parameter, gradient and optimizer bytes per rank, against ddp
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dptrain.config import Config, cpu_cores, resolve
from step_ops import measure as measure_step_ops
from dptrain.components.data import load_mnist, locate, source_files, split_indices

MB = 2**20
CLI = [sys.executable, "-m", "dptrain"]


def gemm_floor(updates: int, batch: int, hidden=(16, 16), repeats: int = 7,
               clock=time.perf_counter) -> float:
    """Seconds per epoch of only the matrix products of forward and backward, on 1 thread.

    Per layer: the forward product, the weight gradient, and (except for the first layer,
    whose input needs no gradient) the input gradient.
    """
    sizes = [784, *hidden, 10]
    xs = [torch.rand(batch, n) for n in sizes[:-1]]
    ws = [torch.rand(b, a) for a, b in zip(sizes, sizes[1:])]
    gs = [torch.rand(batch, b) for b in sizes[1:]]

    def step():
        for i, (x, w, g) in enumerate(zip(xs, ws, gs)):
            x @ w.t()
            g.t() @ x
            if i:
                g @ w

    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(updates):
            step()
        times.append(clock() - start)
    return statistics.median(times)


def pixel_floor(updates: int, batch: int, images: torch.Tensor, repeats: int = 7,
                clock=time.perf_counter) -> float:
    """Seconds per epoch to gather each batch's uint8 rows and widen them to float32."""
    order = torch.randperm(len(images))
    times = []
    for _ in range(repeats):
        start = clock()
        for step in range(updates):
            images.index_select(0, order[step * batch:(step + 1) * batch]).to(torch.float32)
        times.append(clock() - start)
    return statistics.median(times)


def eager_step_floor(epochs: int = 3) -> float:
    """Seconds per epoch of a step's operations written out flat, each timed in place."""
    medians, steps = measure_step_ops(epochs)
    return sum(medians.values()) * steps


def bare_import() -> dict:
    """Wall seconds and peak RSS of a process that only imports torch (and of one that also
    imports torch._dynamo, which DDP's constructor and FSDP's DTensors import)."""
    result = {}
    for name, code in (("torch", "import torch"), ("torch+dynamo", "import torch, torch._dynamo")):
        # VmHWM, as the workers report it (dptrain.distributed.strategy.peak_rss_bytes).
        probe = (f"{code}; print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                 "if l.startswith('VmHWM:')))")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True).stdout
        result[name] = {"seconds": time.perf_counter() - start, "peak_rss_bytes": int(out) * 1024}
    return result


def train_run(mode: str, work: Path, epochs: int, *flags: str, nproc: int = 2,
              device: str = "cpu") -> dict:
    """One `dptrain` run on 1 thread per process; its summary and per-epoch metrics."""
    out = work / f"{mode}-{time.monotonic_ns()}"
    launch = ["--nproc", str(nproc)] if mode != "seq" else []
    command = [*CLI, mode, *launch, "--device", device, "--threads", "1", "--epochs", str(epochs),
               "--out", str(out), *flags]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    summary["epoch_seconds"] = [m["epoch_seconds"] for m in metrics]
    summary["process_seconds"] = elapsed  # the whole command, interpreter start to exit
    return summary


def torchvision_root(work: Path) -> Path:
    """torchvision's MNIST layout (uncompressed files in MNIST/raw), made from the gz files."""
    root = work / "torchvision"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in source_files(*locate("")).values():
        target = raw / path.name.removesuffix(".gz")
        if not target.exists():
            data = path.read_bytes()
            target.write_bytes(gzip.decompress(data) if path.suffix == ".gz" else data)
    return root


def tutorial(root: Path, workers: int) -> float:
    """Seconds of one epoch of the tutorial loop."""
    script = Path(__file__).with_name("tutorial_baseline.py")
    out = subprocess.run([sys.executable, str(script), "--root", str(root), "--workers",
                          str(workers), "--epochs", "1"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"tutorial baseline failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])["epoch_seconds"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=25, help="epochs of the seq and ddp runs")
    parser.add_argument("--json", default="bench.json", help="where to write all measurements")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--loader-workers", default="0,2",
                        help="DataLoader workers of the tutorial baseline (its best counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    mnist = load_mnist("")
    n_train = len(split_indices(len(mnist.labels), 0).train)
    plan = resolve(Config(), mode="seq", world_size=1, n_train=n_train)
    work = Path(args.work or tempfile.mkdtemp(prefix="dptrain-bench-"))
    root = torchvision_root(work)
    images = torch.from_numpy(mnist.images)

    cases = {
        "floor": lambda: {"gemm_seconds": gemm_floor(plan.updates_per_epoch, plan.global_batch),
                          "pixel_seconds": pixel_floor(plan.updates_per_epoch, plan.global_batch,
                                                       images),
                          "eager_step_seconds": eager_step_floor()},
        "import": bare_import,
        "seq": lambda: train_run("seq", work, args.epochs),
        "ddp": lambda: train_run("ddp", work, args.epochs),
        "ddp_gloo": lambda: train_run("ddp", work, args.epochs, "--grad-sync", "collective"),
        "fsdp": lambda: train_run("fsdp", work, 1),
        "tutorial": lambda: {f"workers_{n}": tutorial(root, int(n))
                             for n in args.loader_workers.split(",")},
    }
    samples: dict[str, list] = {name: [] for name in cases}
    started = time.time()
    for round_ in range(args.repeats):
        names = list(cases)
        names = names[round_ % len(names):] + names[:round_ % len(names)]  # rotate the order
        for name in names:
            print(f"round {round_ + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            samples[name].append(cases[name]())

    report = summarize(samples, plan.updates_per_epoch)
    report.update(machine=machine(), repeats=args.repeats, epochs=args.epochs,
                  seconds=time.time() - started, samples=samples)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def median(values) -> float:
    return statistics.median(values)


def summarize(samples: dict[str, list], updates: int) -> dict:
    """Medians of every measure, and the targets as (value, limit, met)."""
    m = {
        "gemm_floor_epoch_s": median(s["gemm_seconds"] for s in samples["floor"]),
        "pixel_floor_epoch_s": median(s["pixel_seconds"] for s in samples["floor"]),
        "eager_step_floor_epoch_s": median(s["eager_step_seconds"] for s in samples["floor"]),
        "import_torch_s": median(s["torch"]["seconds"] for s in samples["import"]),
        "import_torch_rss_mb": median(s["torch"]["peak_rss_bytes"] for s in samples["import"]) / MB,
        "import_dynamo_rss_mb": median(s["torch+dynamo"]["peak_rss_bytes"]
                                       for s in samples["import"]) / MB,
        "tutorial_epoch_s": min(median(s[key] for s in samples["tutorial"])
                                for key in samples["tutorial"][0]),
    }
    for name in ("seq", "ddp", "ddp_gloo", "fsdp"):
        runs = samples[name]
        m[f"{name}_train_s"] = median(r["train_seconds"] for r in runs)
        m[f"{name}_wall_s"] = median(r["wall_seconds"] for r in runs)
        m[f"{name}_startup_s"] = median(r["wall_seconds"] - r["train_seconds"] for r in runs)
        m[f"{name}_process_s"] = median(r["process_seconds"] for r in runs)
        m[f"{name}_launcher_rss_mb"] = median(r["memory"].get("launcher_peak_rss_bytes", 0)
                                              for r in runs) / MB
        m[f"{name}_epoch_s"] = median(median(r["epoch_seconds"]) for r in runs)
        m[f"{name}_peak_rss_mb"] = median(max(r["memory"]["peak_rss_bytes"]) for r in runs) / MB
        m[f"{name}_test_accuracy"] = median(r["test_accuracy"] for r in runs)
    ddp_bytes, fsdp_bytes = (samples[k][0]["memory"] for k in ("ddp", "fsdp"))
    state = ("param_bytes", "grad_bytes", "optimizer_bytes")
    largest_layer = 784 * 16 * 4 + 16 * 4  # first Linear's weight and bias, float32
    fsdp_state = max(sum(fsdp_bytes[k][rank] for k in state) for rank in range(2))
    ddp_state = max(sum(ddp_bytes[k][rank] for k in state) for rank in range(2))
    # One layer's worth for each of parameters, gradients and the two Adam moments.
    fsdp_limit = ddp_state / 2 + 4 * largest_layer
    worst_rss = max(m[f"{k}_peak_rss_mb"] for k in ("seq", "ddp", "fsdp"))
    targets = [
        ("seq epoch / GEMM floor", m["seq_epoch_s"] / m["gemm_floor_epoch_s"], 1.5, "<="),
        ("tutorial epoch / seq epoch", m["tutorial_epoch_s"] / m["seq_epoch_s"], 40, ">="),
        ("ddp-2 train / seq train", m["ddp_train_s"] / m["seq_train_s"], 0.70, "<="),
        ("seq start-up s (limit: import + 1 s)", m["seq_startup_s"], m["import_torch_s"] + 1, "<="),
        ("ddp-2 start-up s (limit: 2.5 x import)", m["ddp_startup_s"],
         2.5 * m["import_torch_s"], "<="),
        ("worst worker peak RSS MB (limit: import + 120)", worst_rss,
         m["import_torch_rss_mb"] + 120, "<="),
        ("fsdp-2 state bytes per rank (limit: ddp/2 + a layer)", fsdp_state, fsdp_limit, "<="),
    ]
    return {"medians": m, "ddp_state_bytes": ddp_state, "fsdp_state_bytes": fsdp_state,
            "targets": [{"name": n, "value": v, "limit": lim, "rule": rule,
                         "met": v <= lim if rule == "<=" else v >= lim}
                        for n, v, lim, rule in targets]}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": cpu_cores(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads_per_process": 1, "host": platform.node()}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, mc = report["medians"], report["machine"]
    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]dptrain benchmark[/]: {mc['cpu']}, {mc['cores']} cores, torch "
                  f"{mc['torch']}, 1 thread per process; medians of {report['repeats']} "
                  f"interleaved rounds ({report['seconds']:.0f} s)")
    table = Table(title="measured (seconds; MB)")
    columns = ("case", "epoch", "train", "wall", "wall-train", "process", "worker RSS",
               "launcher RSS", "test acc")
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    blank = [""] * (len(columns) - 2)
    table.add_row("a GEMM floor", f"{m['gemm_floor_epoch_s']:.4f}", *blank)
    table.add_row("  pixel gather+widen", f"{m['pixel_floor_epoch_s']:.4f}", *blank)
    table.add_row("  eager-step floor", f"{m['eager_step_floor_epoch_s']:.4f}", *blank)
    table.add_row("c tutorial baseline", f"{m['tutorial_epoch_s']:.3f}", *blank)
    for name, label in (("seq", "b seq"), ("ddp", "d ddp -n2 (shm)"),
                        ("ddp_gloo", "  ddp -n2 (gloo)"), ("fsdp", "g fsdp -n2, 1 epoch")):
        launcher = m[f"{name}_launcher_rss_mb"]
        table.add_row(label, f"{m[f'{name}_epoch_s']:.4f}", f"{m[f'{name}_train_s']:.2f}",
                      f"{m[f'{name}_wall_s']:.2f}", f"{m[f'{name}_startup_s']:.2f}",
                      f"{m[f'{name}_process_s']:.2f}", f"{m[f'{name}_peak_rss_mb']:.0f}",
                      f"{launcher:.0f}" if launcher else "-", f"{m[f'{name}_test_accuracy']:.4f}")
    table.add_row("e import torch", "", "", f"{m['import_torch_s']:.2f}", "", "",
                  f"{m['import_torch_rss_mb']:.0f}", "", "")
    table.add_row("  + torch._dynamo", "", "", "", "", "", f"{m['import_dynamo_rss_mb']:.0f}",
                  "", "")
    console.print(table)
    targets = Table(title="targets")
    for column in ("target", "measured", "limit", "met"):
        targets.add_column(column, justify="left" if column == "target" else "right")
    for t in report["targets"]:
        targets.add_row(t["name"], f"{t['value']:.3g}", f"{t['rule']} {t['limit']:.3g}",
                        "[green]yes[/]" if t["met"] else "[red]no[/]")
    console.print(targets)
    eager = m["eager_step_floor_epoch_s"]
    console.print(f"floors: the eager step written out flat is {eager / m['gemm_floor_epoch_s']:.2f}x "
                  f"the GEMM floor (b asks <= 1.5); the tutorial over it is "
                  f"{m['tutorial_epoch_s'] / eager:.1f}x (c asks >= 40); "
                  f"products and pixels alone are "
                  f"{(m['gemm_floor_epoch_s'] + m['pixel_floor_epoch_s']) / m['gemm_floor_epoch_s']:.2f}x "
                  "the GEMM floor. docs/PERFORMANCE.md explains each.")


if __name__ == "__main__":
    main()
