"""A/B of the training step on the CPU: this tree against an earlier commit, run alternately.

    DPTRAIN_DATA_DIR=../shared/data/mnist python benchmarks/ab_step.py --before COMMIT \\
        [--rounds 10] [--epochs 8] [--mode seq|ddp]

Checks out COMMIT into a temporary git worktree, then runs `dptrain MODE` (the default config,
one thread per process, no checkpoints) from each tree in turn: each round runs both, the order
of the pair alternating, so that drift of the machine hits both alike. A run's time is the
median of its `epoch_seconds` after the first epoch (the training steps alone); the table shows
every round, the medians, and after/before. Both trees must end with identical parameters.
Issue 19's per-step changes must leave the CPU step no slower: after/before <= 1, within noise.
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

REPO = Path(__file__).resolve().parents[1]


def worktree(commit: str, folder: Path) -> Path:
    """`commit` checked out (detached) into `folder`, a worktree of this repository."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(folder),
                    commit], check=True)
    return folder


def run(tree: Path, mode: str, epochs: int, out: Path) -> float:
    """Median seconds per epoch (after the first) of one run of `tree`'s dptrain."""
    launch = ["--nproc", "2"] if mode != "seq" else []
    command = [sys.executable, "-m", "dptrain", mode, *launch, "--epochs", str(epochs),
               "--threads", "1", "--device", "cpu", "--checkpoint-every", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=out.parent, env=env)
    if result.returncode:
        sys.exit(f"{tree}: {' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["epoch_seconds"] for m in metrics[1:] or metrics)


def same_parameters(a: Path, b: Path) -> bool:
    import torch

    first, second = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    return list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--mode", choices=("seq", "ddp"), default="seq")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dptrain-ab-") as tmp:
        trees = {"before": worktree(args.before, Path(tmp) / "before"), "after": REPO}
        try:
            times: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for name in order:
                    out = Path(tmp) / f"{name}-{round_}"
                    times[name].append(run(trees[name], args.mode, args.epochs, out))
                print(f"round {round_ + 1}: " + "  ".join(
                    f"{name} {times[name][-1] * 1e3:.1f} ms" for name in trees), flush=True)
            same = same_parameters(Path(tmp) / "before-0", Path(tmp) / "after-0")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(trees["before"])], check=False)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.mode}, {args.epochs} epochs x {args.rounds} rounds, seconds per epoch "
          f"(median of each run's epochs after the first; before = {args.before})")
    for name, values in times.items():
        print(f"  {name:6}  median {medians[name] * 1e3:7.2f} ms   "
              f"min {min(values) * 1e3:7.2f}   max {max(values) * 1e3:7.2f}")
    print(f"  after / before: {medians['after'] / medians['before']:.3f}")
    print(f"  identical parameters: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
