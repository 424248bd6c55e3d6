"""`dptrain seq` with its defaults, on an idle machine and beside a busy process, alternately.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/busy.py [--rounds 3] [-- FLAGS]

Issue 13's acceptance measurement: beside one other process that keeps about one core busy, the
default `dptrain seq` must train within 1.5x of its idle time. (With the old default of 2
threads on 2 cores it took ~10x.) Each round runs the command once alone and once beside a
spinning Python process, in alternating order, so that drift of a shared machine hits both;
the table shows medians of train_seconds (the epoch loop) and wall_seconds (the command).
Flags after `--` go to every run (e.g. `-- --threads 2` shows what the old default did).
"idle" means no process of ours beside it: the load average is printed with the table, since
other users of the machine count too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dptrain.config import cpu_cores

TARGET = 1.5  # the bound: busy train seconds / idle train seconds
SPIN = "while True: pass"  # one busy core, as another user's job would take


def run_seq(out: Path, flags: list[str]) -> dict:
    """One `dptrain seq` into `out`; its summary.json."""
    command = [sys.executable, "-m", "dptrain", "seq", "--out", str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return json.loads((out / "summary.json").read_text())


def beside_a_busy_process(out: Path, flags: list[str]) -> dict:
    """The same run while another process spins on one core."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.5)  # let the scheduler see it busy before the run starts
        return run_seq(out, flags)
    finally:
        spinner.kill()
        spinner.wait()


def measure(rounds: int, flags: list[str], work: Path) -> dict[str, list[dict]]:
    runs = {"idle": [], "busy": []}
    for r in range(rounds):
        order = ("idle", "busy") if r % 2 == 0 else ("busy", "idle")
        for case in order:
            out = work / f"{case}-{r}"
            summary = (run_seq(out, flags) if case == "idle"
                       else beside_a_busy_process(out, flags))
            runs[case].append(summary)
            print(f"  round {r + 1} {case:4s}: train {summary['train_seconds']:6.2f} s  wall "
                  f"{summary['wall_seconds']:6.2f} s  threads {summary['threads']}", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("flags", nargs="*", help="flags for every `dptrain seq` (after --)")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"{cpu_cores()} cores; load average {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) "
          f"before; `dptrain seq {' '.join(args.flags)}`, {args.rounds} alternating rounds")
    with tempfile.TemporaryDirectory(prefix="dptrain-busy-") as work:
        runs = measure(args.rounds, args.flags, Path(work))
    median = {case: {key: statistics.median(s[key] for s in summaries)
                     for key in ("train_seconds", "wall_seconds")}
              for case, summaries in runs.items()}
    print(f"load average {os.getloadavg()[0]:.2f} after (1 min)")
    print(f"{'':6s} {'train s':>8s} {'wall s':>8s}")
    for case in ("idle", "busy"):
        print(f"{case:6s} {median[case]['train_seconds']:8.2f} {median[case]['wall_seconds']:8.2f}")
    ratio = median["busy"]["train_seconds"] / median["idle"]["train_seconds"]
    wall_ratio = median["busy"]["wall_seconds"] / median["idle"]["wall_seconds"]
    verdict = "within" if ratio <= TARGET else "NOT within"
    print(f"busy / idle: train {ratio:.2f}x, wall {wall_ratio:.2f}x; {verdict} {TARGET}x")


if __name__ == "__main__":
    main()
