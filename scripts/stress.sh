#!/usr/bin/env bash
# Stress: short ddp/fsdp jobs, two at a time, with workers killed (SIGKILL) at random moments.
# Every job runs with --max-restarts, so it must resume from its checkpoint and finish with
# exactly the parameters of the same job run without interruption. Afterwards no worker may be
# left.
#
#   scripts/stress.sh [JOBS=12] [SEED=0]        (run from the repository root; needs MNIST as
#                                                for the tests: $DPTRAIN_DATA_DIR or the cache)
# Prints one summary line; exits 1 if any run was lost or any process left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python - "${1:-12}" "${2:-0}" <<'EOF'
import json, os, random, signal, subprocess, sys, tempfile, threading, time
from pathlib import Path

import torch

JOBS, SEED = int(sys.argv[1]), int(sys.argv[2])
# Sized so that training outlasts start-up by a few seconds on 2 cores (forked workers start
# in ~3 s): most kill moments below then land in training, some in start-up. (fsdp runs the
# default model as one FSDP unit now, ~0.25 s an epoch at batch 1024: 15 epochs.)
FLAGS = {"ddp": ["--batch-size", "256", "--epochs", "15"],
         "fsdp": ["--batch-size", "1024", "--epochs", "15"]}
root = Path(tempfile.mkdtemp(prefix="dptrain-stress-"))
rng = random.Random(SEED)


def cli(*args, log):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dptrain", *args, "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT)


def descendants(pid):
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += [c for c in children if c not in found]
            found.update(children)
    return found


def alive(pids):
    left = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left.add(pid)
        except OSError:
            pass
    return left


def job(i, mode, results):
    """One run with up to two workers killed at random moments after start-up."""
    out = root / f"job{i:02d}-{mode}"
    process = cli(mode, "--nproc", "2", "--out", str(out), "--max-restarts", "3", *FLAGS[mode],
                  log=root / f"job{i:02d}.log")
    kills, seen = [], set()
    moments = sorted(rng.uniform(2.5, 7) for _ in range(rng.choice([1, 2])))
    start = time.monotonic()
    while process.poll() is None:
        seen |= descendants(process.pid)
        workers = sorted(descendants(process.pid))
        if moments and workers and time.monotonic() - start > moments[0]:
            moments.pop(0)  # a moment during start-up waits for the workers
            victim = rng.choice(workers)
            try:
                os.kill(victim, signal.SIGKILL)
                kills.append(round(time.monotonic() - start, 1))
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    results[i] = {"mode": mode, "out": out, "rc": process.returncode, "kills": kills,
                  "seen": seen}


def reference(mode):
    """The same job, never interrupted: a resumed job must end with exactly its parameters
    (parity of that run with seq is the parity tests' business)."""
    out = root / f"reference-{mode}"
    assert cli(mode, "--nproc", "2", "--out", str(out), *FLAGS[mode],
               log=root / f"reference-{mode}.log").wait() == 0
    return torch.load(out / "model.pt", weights_only=True)


started = time.monotonic()
references = {mode: reference(mode) for mode in FLAGS}
results = {}
modes = [("ddp", "fsdp")[i % 2] for i in range(JOBS)]
for pair in range(0, JOBS, 2):  # two at a time
    threads = [threading.Thread(target=job, args=(i, modes[i], results))
               for i in range(pair, min(pair + 2, JOBS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

lost, orphans, restarts = [], set(), 0
time.sleep(1)
for i, r in sorted(results.items()):
    orphans |= alive(r["seen"])
    problem = ""
    if r["rc"] != 0:
        problem = f"exit {r['rc']}"
    else:
        summary = json.loads((r["out"] / "summary.json").read_text())
        restarts += summary["restarts"]
        state = torch.load(r["out"] / "model.pt", weights_only=True)
        worst = max((state[k] - references[r["mode"]][k]).abs().max().item() for k in state)
        if worst != 0:  # a resume on the CPU is exact
            problem = f"parameters differ from the uninterrupted run by {worst:.2e}"
    print(f"job {i:2d} {r['mode']:4s} kills at {r['kills']} s: "
          f"{problem or 'finished, equal to the uninterrupted run'}")
    if problem:
        lost.append(i)
kills = sum(len(r["kills"]) for r in results.values())
print(f"stress: {JOBS} jobs, {kills} workers killed, {restarts} restarts, {len(lost)} lost runs, "
      f"{len(orphans)} orphan processes, {time.monotonic() - started:.0f} s (logs in {root})")
sys.exit(1 if lost or orphans else 0)
EOF
