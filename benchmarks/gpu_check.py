"""The GPU machine's check (issue 10), in one run of a few minutes: floors, the CUDA runs, parity.

    DPTRAIN_DATA_DIR=... python benchmarks/gpu_check.py [--epochs 25] [--json out.json]
    DPTRAIN_DATA_DIR=... python benchmarks/gpu_check.py --cpu --epochs 2     # a dry run, no GPU

Steps, each under its own time limit so that one hang costs only its part:
  1. the machine, and a bare `import torch` (median of 3);
  2. the floors of the step (gpu_floor.py): a hand-written eager loop and a CUDA graph of it;
  3. `dptrain seq`, `ddp --nproc 1` and `fsdp --nproc 1` on the GPU, ddp and fsdp with fresh
     and with forked workers (--start-method), and `seq` on one CPU thread: per-epoch median,
     train seconds, wall seconds and wall - train (start-up), test accuracy;
  4. parity: each run's final parameters against CUDA seq's and against seq on the CPU, and the
     fp32 precision each run recorded (IEEE: TF32 pinned off);
  5. forking: ddp with forked workers also where the user set PYTORCH_NVML_BASED_CUDA_CHECK=0
     (the launcher must still fork them usable), and where NVML cannot answer (MIG-style
     CUDA_VISIBLE_DEVICES): then one warning line, fresh workers, and one error line, never
     "Cannot re-initialize CUDA in forked subprocess" tracebacks;
  6. no host sync inside an epoch: one epoch of seq, ddp-1 and fsdp-1 steps in-process under
     torch.cuda.set_sync_debug_mode("warn"), after a warm-up epoch; the syncs counted;
  7. two gloo ranks sharing the one GPU (ddp, fsdp; --backend gloo), 3 epochs, against seq;
  8. a user error: two nccl ranks on one GPU must be one line and exit status 2;
  9. the issue's targets as ratios within this run.
--cpu runs every step that does not need a GPU on the CPU instead, to check the harness (the
sync counts and the NVML fallback need CUDA: they are left out there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "dptrain"]


def timed(command: list[str], limit: float,
          env: dict | None = None) -> tuple[subprocess.CompletedProcess | None, float]:
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                cwd=HERE.parent, env={**os.environ, **(env or {})})
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


FORK_FALLBACK = "starting the workers fresh instead"


def train(name: str, mode: str, device: str, epochs: int, work: Path, *flags: str,
          nproc: int = 1, env: dict | None = None) -> dict:
    """One `dptrain` run; its numbers, or its error."""
    out = work / name
    launch = ["--nproc", str(nproc)] if mode != "seq" else []
    command = [*CLI, mode, *launch, "--device", device, "--epochs", str(epochs), "--out",
               str(out), *flags]
    result, elapsed = timed(command, 240, env)
    row = {"name": name, "command": " ".join(command[2:]), "process_seconds": elapsed,
           "env": env or {}}
    if result is not None:  # what the user saw: the fork's fallback line, a traceback
        row.update(fork_fallback=FORK_FALLBACK in result.stderr,
                   traceback="Traceback" in result.stderr + result.stdout,
                   exit_status=result.returncode,
                   error_lines=[line for line in result.stderr.splitlines()
                                if line.startswith("dptrain: error:")])
    if result is None or result.returncode or not (out / "summary.json").exists():
        row["error"] = "timed out" if result is None else (result.stderr or result.stdout)[-1500:]
        return row
    summary = json.loads((out / "summary.json").read_text())
    epochs_s = [json.loads(line)["epoch_seconds"]
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    row.update(epoch_seconds=statistics.median(epochs_s), train_seconds=summary["train_seconds"],
               wall_seconds=summary["wall_seconds"],
               startup_seconds=summary["wall_seconds"] - summary["train_seconds"],
               test_accuracy=summary["test_accuracy"], memory=summary["memory"],
               fp32_precision=summary.get("fp32_precision"))
    return row


def max_difference(a: Path, b: Path) -> float | None:
    import torch

    try:
        sa = torch.load(a / "model.pt", weights_only=True)
        sb = torch.load(b / "model.pt", weights_only=True)
    except OSError:
        return None
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_probe(mode: str, device: str) -> dict:
    """The host syncs in one epoch of `mode`'s steps on one rank, in this process, counted by
    torch.cuda.set_sync_debug_mode("warn") after a warm-up epoch (on the CPU the same loop runs
    uncounted). The epoch's end (one read of the loss sum and skip count) is left out: it is
    the one read an epoch makes on purpose."""
    import warnings
    from dataclasses import replace

    import torch

    from dptrain.components.data import epoch_order, load_mnist, split_indices
    from dptrain.components.model import MLP
    from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
    from dptrain.config import Config, resolve
    from dptrain.distributed.strategy import DistEnv, make_strategy
    from dptrain.train import Samples, global_batches, rank_slice

    if mode != "seq":  # a process group of one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    config = Config()
    strategy = make_strategy(mode, DistEnv.from_environ(), replace(config.system, device=device))
    mnist = load_mnist("")
    split = split_indices(len(mnist.labels), config.data.split_seed)
    plan = resolve(config, mode=mode, world_size=1, n_train=len(split.train))
    torch.manual_seed(0)
    model = strategy.wrap(MLP())
    samples, guard = Samples(mnist, strategy.device), NonFiniteGuard(strategy.device)
    step = make_step(strategy, model, make_optimizer(config.optim, model.parameters(), plan.lr,
                                                     skip_if=guard.flag), samples, guard)

    def epoch(number: int) -> None:
        step.begin_epoch(plan.updates_per_epoch)
        order = epoch_order(split.train, 0, number)[:plan.samples_per_epoch]
        for index, rows in enumerate(global_batches(samples.rows(order), plan.global_batch)):
            step(index, rank_slice(rows, strategy), len(rows), plan.lr_at(index))

    cuda = strategy.device.type == "cuda"
    epoch(1)
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        epoch(2)
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message).lower()]
    strategy.close()
    return {"mode": mode, "device": str(strategy.device), "updates": plan.updates_per_epoch,
            "syncs": len(syncs) if cuda else None, "first_syncs": syncs[:3],
            "fp32_precision": strategy.fp32_precision}


def sync_probes(device: str) -> list[dict]:
    """sync_probe of seq, ddp and fsdp, each in a fresh process (CUDA stays out of this one)."""
    rows = []
    for mode in ("seq", "ddp", "fsdp"):
        result, _ = timed([sys.executable, __file__, "--sync-probe", mode, "--device", device], 300)
        if result is None or result.returncode:
            rows.append({"mode": mode, "error": "timed out" if result is None
                         else result.stderr[-1500:]})
        else:
            rows.append(json.loads(result.stdout.splitlines()[-1]))
    return rows


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

    for row in runs.values():  # parity: to round-off (the ranks of one GPU sum in one order)
        if row.get("max_diff_vs_seq") is not None and row["name"] != "seq":
            add(f"{row['name']} max |param - seq's|", row["max_diff_vs_seq"], 1e-4)
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
    parser.add_argument("--sync-probe", choices=("seq", "ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sync_probe:  # one step of the harness, in a process of its own
        print(json.dumps(sync_probe(args.sync_probe, args.device)))
        return
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
        report["runs"].append(train(name, mode, on, args.epochs, work, *flags))
        print(f"{name}: done", flush=True)
    for row in report["runs"]:  # parity, once the CPU run is there too
        row["max_diff_vs_seq"] = max_difference(work / row["name"], work / "seq")
        row["max_diff_vs_cpu_seq"] = max_difference(work / row["name"], work / "cpu-seq")
        print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)

    # Forking where the user asked torch to skip NVML, and where NVML cannot answer.
    short = min(args.epochs, 3)
    forks = [train("ddp-fork-nvml-0", "ddp", device, short, work, "--start-method", "fork",
                   env={"PYTORCH_NVML_BASED_CUDA_CHECK": "0"})]
    if device == "cuda":  # expected: the fallback line, fresh workers, one error line, exit 2
        forks.append(train("ddp-fork-nvml-blind", "ddp", device, short, work, "--start-method",
                           "fork", env={"CUDA_VISIBLE_DEVICES": "MIG-none"}))
    for row in forks:
        print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
    report["forks"] = forks
    report["sync"] = sync_probes(device)
    for row in report["sync"]:
        print("host syncs in an epoch:", json.dumps(row), flush=True)

    # Several ranks on one GPU through gloo (nccl refuses), against seq at the same epochs.
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
        print(f"{t['target']:45s} {t['value']:10.4g}  limit {t['limit']:<6g}  "
              f"{'met' if t['met'] else 'NOT met'}")
    report["seconds"] = time.perf_counter() - started
    print(f"done in {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
