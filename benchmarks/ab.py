"""An alternating A/B of training runs: two source trees (before/after a change) or one tree
with two sets of flags (a feature off/on), timed on the same machine in the same minutes.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/ab.py --a HEAD~3 --b . \
        [--cases seq,ddp] [--epochs 10] [--rounds 5] [--a-flags ...] [--b-flags ...] [--json ab.json]

--a/--b: a folder holding a dptrain tree, or a git revision of this repository (checked out
into a temporary worktree). Each round runs every case once with A and once with B, A first in
odd rounds and B first in even ones, so that a machine's drift hits both sides alike. A run is
`python -m dptrain MODE --device cpu --threads 1 --checkpoint-every 0` with that side's tree
first on PYTHONPATH. The measure of a run is its median epoch_seconds over epochs 2.. (the
first pays first touches); a case's verdict is the median over rounds of the paired ratio
B / A, with its range, beside the medians of each side. Shared machines are noisy: read the
paired ratios, and repeat when their range straddles the difference you care about.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"seq": ("seq", 1), "ddp": ("ddp", 2), "fsdp": ("fsdp", 2)}


def source_tree(spec: str, scratch: Path) -> tuple[Path, str]:
    """(a folder with the dptrain package, what it is) for a folder or a git revision."""
    path = Path(spec)
    if (path / "dptrain" / "__init__.py").is_file():
        return path.resolve(), f"{path} (working tree)"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", spec],
                            capture_output=True, text=True)
    if commit.returncode:
        sys.exit(f"ab.py: {spec} is neither a dptrain folder nor a git revision")
    tree = scratch / f"tree-{commit.stdout.strip()}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree),
                        spec], check=True)
    return tree, f"{spec} ({commit.stdout.strip()})"


def run_once(tree: Path, mode: str, nproc: int, epochs: int, flags: list[str],
             work: Path) -> dict:
    """One training; its per-epoch seconds, train and wall seconds."""
    out = work / f"{mode}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "dptrain", mode, "--device", "cpu", "--threads", "1",
               "--epochs", str(epochs), "--checkpoint-every", "0", "--out", str(out), *flags]
    if mode != "seq":
        command[4:4] = ["--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if result.returncode:
        sys.exit(f"ab.py: {' '.join(command)} (PYTHONPATH={tree}) failed:\n{result.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    epochs_s = [json.loads(line)["epoch_seconds"]
                for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(out)
    return {"epoch_s": statistics.median(epochs_s[1:] or epochs_s),
            "train_s": summary["train_seconds"], "wall_s": summary["wall_seconds"],
            "test_accuracy": summary["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="HEAD", help="before: a folder or a git revision")
    parser.add_argument("--b", default=".", help="after: a folder or a git revision")
    parser.add_argument("--a-flags", default="", help="extra training flags of side A")
    parser.add_argument("--b-flags", default="", help="extra training flags of side B")
    parser.add_argument("--cases", default="seq,ddp", help=f"of {','.join(CASES)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="", help="also write every sample here")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"ab.py: unknown case {unknown[0]}; choose from {', '.join(CASES)}")

    scratch = Path(tempfile.mkdtemp(prefix="dptrain-ab-"))
    try:
        sides = {"A": (*source_tree(args.a, scratch), shlex.split(args.a_flags)),
                 "B": (*source_tree(args.b, scratch), shlex.split(args.b_flags))}
        samples = {case: {"A": [], "B": []} for case in cases}
        started = time.time()
        for round_ in range(args.rounds):
            order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
            for case in cases:
                mode, nproc = CASES[case]
                for side in order:
                    tree, _, flags = sides[side]
                    sample = run_once(tree, mode, nproc, args.epochs, flags, scratch)
                    samples[case][side].append(sample)
                    print(f"round {round_ + 1}/{args.rounds} {case} {side}: epoch "
                          f"{sample['epoch_s']:.4f} s, train {sample['train_s']:.2f} s, wall "
                          f"{sample['wall_s']:.2f} s", file=sys.stderr, flush=True)
        report = summarize(samples)
        print_report(report, sides, args, time.time() - started)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"a": sides["A"][1], "b": sides["B"][1], "a_flags": args.a_flags,
                 "b_flags": args.b_flags, "epochs": args.epochs, "rounds": args.rounds,
                 "load_before": os.getloadavg(), "report": report, "samples": samples},
                indent=1) + "\n")
    finally:
        for tree in scratch.glob("tree-*"):
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def summarize(samples: dict) -> dict:
    """Per case and measure: the median of each side and of the paired ratios B / A."""
    report = {}
    for case, sides in samples.items():
        report[case] = {}
        for measure in ("epoch_s", "train_s", "wall_s"):
            a = [s[measure] for s in sides["A"]]
            b = [s[measure] for s in sides["B"]]
            ratios = [y / x for x, y in zip(a, b)]
            report[case][measure] = {"a": statistics.median(a), "b": statistics.median(b),
                                     "ratio": statistics.median(ratios),
                                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return report


def print_report(report: dict, sides: dict, args, seconds: float) -> None:
    print(f"A = {sides['A'][1]} {args.a_flags}".rstrip())
    print(f"B = {sides['B'][1]} {args.b_flags}".rstrip())
    print(f"{args.rounds} alternating rounds of {args.epochs} epochs, {seconds:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{'case':6} {'measure':8} {'A':>9} {'B':>9} {'B/A':>7}  paired range")
    for case, measures in report.items():
        for measure, r in measures.items():
            print(f"{case:6} {measure:8} {r['a']:9.4f} {r['b']:9.4f} {r['ratio']:7.3f}  "
                  f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}")


if __name__ == "__main__":
    main()
