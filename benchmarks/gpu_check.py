"""The GPU machine's check (issue 10), in one run of a few minutes: floors, the CUDA runs, parity.

    DPTRAIN_DATA_DIR=... python benchmarks/gpu_check.py [--epochs 25] [--json out.json]
    DPTRAIN_DATA_DIR=... python benchmarks/gpu_check.py --cpu --epochs 2     # a dry run, no GPU

Steps, each under its own time limit so that one hang costs only its part:
  1. the machine, and a bare `import torch` (median of 3);
  2. the floors of the step (gpu_floor.py): a hand-written eager loop and a CUDA graph of it;
  3. `dptrain seq`, `ddp --nproc 1` and `fsdp --nproc 1` on the GPU, ddp and fsdp with fresh
     and with forked workers (--start-method), and `seq` on one CPU thread: per-epoch median,
     train seconds, wall seconds and wall - train (start-up), test accuracy;
  4. parity: each run's final parameters against CUDA seq's;
  5. two gloo ranks sharing the one GPU (ddp, fsdp; --backend gloo), 3 epochs, against seq;
  6. a user error: two nccl ranks on one GPU must be one line and exit status 2;
  7. the issue's targets as ratios within this run.
--cpu runs every step that does not need a GPU on the CPU instead, to check the harness.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "dptrain"]


def timed(command: list[str], limit: float) -> tuple[subprocess.CompletedProcess | None, float]:
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        result = None
    return result, time.perf_counter() - start


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        info["gpus"] = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
    info["cores"] = len(__import__("os").sched_getaffinity(0))
    imports = [timed([sys.executable, "-c", "import torch"], 120)[1] for _ in range(3)]
    info["import_torch_seconds"] = statistics.median(imports)
    return info


def floors(device: str, epochs: int, work: Path) -> dict:
    out = work / "floor.json"
    result, _ = timed([sys.executable, str(HERE / "gpu_floor.py"), "--device", device,
                       "--epochs", str(epochs), "--json", str(out)], 300)
    if result is None or result.returncode:
        return {"error": "timed out" if result is None else result.stderr[-2000:]}
    data = json.loads(out.read_text())
    return {name: statistics.median(data[name]) for name in ("eager", "graph") if name in data}


def train(name: str, mode: str, device: str, epochs: int, work: Path, *flags: str,
          nproc: int = 1) -> dict:
    """One `dptrain` run; its numbers, or its error."""
    out = work / name
    launch = ["--nproc", str(nproc)] if mode != "seq" else []
    command = [*CLI, mode, *launch, "--device", device, "--epochs", str(epochs), "--out",
               str(out), *flags]
    result, elapsed = timed(command, 240)
    row = {"name": name, "command": " ".join(command[2:]), "process_seconds": elapsed}
    if result is None or result.returncode or not (out / "summary.json").exists():
        row["error"] = "timed out" if result is None else (result.stderr or result.stdout)[-1500:]
        return row
    summary = json.loads((out / "summary.json").read_text())
    epochs_s = [json.loads(line)["epoch_seconds"]
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    row.update(epoch_seconds=statistics.median(epochs_s), train_seconds=summary["train_seconds"],
               wall_seconds=summary["wall_seconds"],
               startup_seconds=summary["wall_seconds"] - summary["train_seconds"],
               test_accuracy=summary["test_accuracy"], memory=summary["memory"])
    return row


def max_difference(a: Path, b: Path) -> float | None:
    import torch

    try:
        sa = torch.load(a / "model.pt", weights_only=True)
        sb = torch.load(b / "model.pt", weights_only=True)
    except OSError:
        return None
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def user_error(device: str, work: Path) -> dict:
    result, _ = timed([*CLI, "ddp", "--nproc", "2", "--device", device, "--backend", "nccl",
                       "--epochs", "1", "--out", str(work / "too-many")], 120)
    if result is None:
        return {"error": "timed out"}
    lines = result.stderr.strip().splitlines()
    return {"exit_status": result.returncode, "stderr_lines": len(lines),
            "line": lines[-1] if lines else ""}


def targets(report: dict) -> list[dict]:
    runs = {row["name"]: row for row in report["runs"] if "error" not in row}
    floor = report["floors"].get("graph")
    seq = runs.get("seq")
    checks = []

    def add(name, value, limit):
        if value is not None:
            checks.append({"target": name, "value": value, "limit": limit, "met": value <= limit})

    if seq:
        add("seq epoch / CUDA-graph floor", floor and seq["epoch_seconds"] / floor, 1.5)
        add("seq wall - train - import torch (s)",
            seq["startup_seconds"] - report["machine"]["import_torch_seconds"], 2.0)
        for name in ("ddp-fresh", "ddp-fork", "fsdp-fresh", "fsdp-fork"):
            if name in runs:
                limit = 1.3 if name.startswith("ddp") else 3.0
                add(f"{name} epoch / seq epoch", runs[name]["epoch_seconds"] / seq["epoch_seconds"],
                    limit)
                add(f"{name} wall - train minus seq's (s)",
                    runs[name]["startup_seconds"] - seq["startup_seconds"], 2.0)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--json", default="")
    parser.add_argument("--cpu", action="store_true", help="a dry run of the harness on the CPU")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()
    report = {"machine": machine(), "epochs": args.epochs, "device": device}
    print("machine:", json.dumps(report["machine"]), flush=True)
    report["floors"] = floors(device, args.epochs, work)
    print("floors (s per epoch):", report["floors"], flush=True)

    plan = [("seq", "seq", device, []), ("ddp-fresh", "ddp", device, ["--start-method", "fresh"]),
            ("ddp-fork", "ddp", device, ["--start-method", "fork"]),
            ("fsdp-fresh", "fsdp", device, ["--start-method", "fresh"]),
            ("fsdp-fork", "fsdp", device, ["--start-method", "fork"]),
            ("cpu-seq", "seq", "cpu", ["--threads", "1"])]
    report["runs"] = []
    for name, mode, on, flags in plan:
        row = train(name, mode, on, args.epochs, work, *flags)
        row["max_diff_vs_seq"] = max_difference(work / name, work / "seq")
        report["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)

    # Several ranks on one GPU through gloo (nccl refuses), against seq at the same epochs.
    short = min(args.epochs, 3)
    shared = [train("seq-short", "seq", device, short, work)]
    for mode in ("ddp", "fsdp"):
        shared.append(train(f"{mode}-gloo-2", mode, device, short, work, "--backend", "gloo",
                            nproc=2))
    for row in shared:
        row["max_diff_vs_seq"] = max_difference(work / row["name"], work / "seq-short")
        print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
    report["shared_gpu"] = shared
    report["user_error"] = user_error(device, work)
    print("user error:", report["user_error"], flush=True)
    report["targets"] = targets(report)
    for t in report["targets"]:
        print(f"{t['target']:45s} {t['value']:8.3f}  limit {t['limit']:5.2f}  "
              f"{'met' if t['met'] else 'NOT met'}")
    report["seconds"] = time.perf_counter() - started
    print(f"done in {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
