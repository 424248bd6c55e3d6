"""What timing the phases costs: `dptrain seq` and `dptrain ddp --nproc 2` (defaults) with the
phase timers on and off, alternately.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/telemetry_ab.py [--rounds 10]
        [--before DIR] [--json ab.json]

Issue 18's bound: with the timers on (the default), an epoch takes at most 2% longer than with
--no-phase-times. Each round runs every case's arms back to back, in an order that alternates
from round to round, so that a shared machine's drift hits both arms alike. Per run the number
is the median epoch_seconds over epochs 2 to N (the first pays first touches); per round the
ratio on/off of the same case; the table shows the median ratio over rounds and its spread.
--before DIR adds a third arm: the code of a checkout from before telemetry (e.g. a worktree
of main at the commit before the merge), run with PYTHONPATH=DIR, so that the heartbeat and
the hook wrapper, which --no-phase-times keeps, are measured too. No checkpoints
(--checkpoint-every 0): their writing is not in epoch_seconds and only adds noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BOUND = 1.02  # on / off, per epoch
CASES = {"seq": ["seq"], "ddp-2": ["ddp", "--nproc", "2"]}


def run(case: str, arm: str, work: Path, epochs: int, before: str | None) -> dict:
    """One training; its median epoch seconds (epochs 2..N) and train seconds."""
    out = work / f"{case}-{arm}"
    command = [sys.executable, "-m", "dptrain", *CASES[case], "--epochs", str(epochs),
               "--checkpoint-every", "0", "--device", "cpu", "--out", str(out), "--force"]
    env = dict(os.environ)
    if arm == "off":
        command.append("--no-phase-times")
    if arm == "before":
        env["PYTHONPATH"] = before
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    seconds = [json.loads(line)["epoch_seconds"]
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"epoch_seconds": statistics.median(seconds[1:] or seconds),
            "train_seconds": summary["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=25, help="per run (the default config's)")
    parser.add_argument("--cases", default="seq,ddp-2", help="of: " + ", ".join(CASES))
    parser.add_argument("--before", help="a checkout of the code before telemetry: a third arm")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    arms = ["on", "off"] + (["before"] if args.before else [])
    cases = args.cases.split(",")
    samples = {case: {arm: [] for arm in arms} for case in cases}
    with tempfile.TemporaryDirectory(prefix="telemetry-ab-") as tmp:
        for round_ in range(args.rounds):
            order = arms if round_ % 2 == 0 else arms[::-1]  # A B, then B A, ...
            for case in cases:
                for arm in order:
                    samples[case][arm].append(run(case, arm, Path(tmp), args.epochs, args.before))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.rounds} alternating rounds of {args.epochs} epochs; load average "
          f"{os.getloadavg()[0]:.1f}; medians of each run's epochs 2 to {args.epochs}")
    print(f"{'case':6} {'arm':7} {'epoch ms':>9} {'train s':>8} {'/ off':>7} {'spread':>15}")
    verdict = {}
    for case in cases:
        off = samples[case]["off"]
        for arm in arms:
            runs = samples[case][arm]
            ratios = sorted(r["epoch_seconds"] / o["epoch_seconds"] for r, o in zip(runs, off))
            median = statistics.median(ratios)
            print(f"{case:6} {arm:7} "
                  f"{statistics.median(r['epoch_seconds'] for r in runs) * 1e3:9.2f} "
                  f"{statistics.median(r['train_seconds'] for r in runs):8.3f} {median:7.3f} "
                  f"{ratios[0]:7.3f}-{ratios[-1]:.3f}")
            if arm != "off":
                verdict[f"{case} {arm}"] = median
    for name, ratio in verdict.items():
        print(f"{name} / off: {ratio:.3f} -> {'within' if ratio <= BOUND else 'OVER'} "
              f"the {BOUND - 1:.0%} bound")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "epochs": args.epochs,
                                         "samples": samples, "ratios": verdict}, indent=2))


if __name__ == "__main__":
    main()
