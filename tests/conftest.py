"""Shared helpers: the real MNIST folder, a tiny IDX writer, a free port, and CLI runners.

The suite finds MNIST the way the CLI does: $DPTRAIN_DATA_DIR, else the cache
($DPTRAIN_CACHE_DIR/mnist or ~/.cache/dptrain/mnist), which the first run fills once from the
mirrors. After that, nothing in the suite reaches the network.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dptrain.components import data

REPO = Path(__file__).resolve().parents[1]


def mnist_location() -> tuple[Path | None, str]:
    """(the folder the suite reads MNIST from, where it came from), as the CLI finds it; (None,
    the reason) when $DPTRAIN_DATA_DIR names no folder."""
    try:
        return data.locate("")
    except data.DataError as e:
        return None, str(e)


MNIST_DIR = (mnist_location()[0] or Path()).resolve()


def provide_mnist(folder: Path | None, origin: str) -> None:
    """Make sure `folder` holds the four .gz files (tests copy them): downloaded into the cache
    once if that is where they belong; else pytest stops with the reason."""
    try:
        if folder is None:
            raise data.DataError(origin)
        data.source_files(folder, origin)
    except data.DataError as e:
        pytest.exit(f"MNIST for the tests: {e}", returncode=2)
    missing = [stem for stem, _, _ in data.FILES.values() if not (folder / f"{stem}.gz").is_file()]
    if missing:
        pytest.exit(f"MNIST for the tests: {folder} has no {missing[0]}.gz; the tests need the "
                    "four .gz files (point DPTRAIN_DATA_DIR at them)", returncode=2)


# What running code may add to a checkout: Python's and pytest's caches, an editable install.
CACHES = {"__pycache__", ".pytest_cache", ".git"}


def checkout_listing(root: Path = REPO) -> set[str]:
    """Every file and folder below `root` (relative paths), its caches left out: what a test
    run must leave as it found it."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in CACHES and not d.endswith(".egg-info")]
        base = Path(folder).relative_to(root)
        found.update(str(base / name) for name in dirs + files)
    return found


def changed_paths(before: set[str], after: set[str]) -> str:
    """'added a, b; removed c' ('' when equal), the first few of each."""
    def few(paths):
        paths = sorted(paths)
        return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

    parts = [f"{verb} {few(paths)}" for verb, paths in (("added", after - before),
                                                         ("removed", before - after)) if paths]
    return "; ".join(parts)


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Real MNIST, a private decode cache, no way to reach a real mirror, and a private working
    folder: the CLI's relative defaults (runs/..., model.pt) land there, never in the checkout,
    which the session leaves as it found it (a user's model.pt there changes no test)."""
    provide_mnist(*mnist_location())
    listed = checkout_listing()
    saved, saved_cwd = dict(os.environ), os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    # Processes started from that folder import the tree under test, not another install.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ["DPTRAIN_DATA_DIR"] = str(MNIST_DIR.resolve())
    os.environ["DPTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["DPTRAIN_MNIST_MIRRORS"] = "http://127.0.0.1:9/unreachable/"
    os.environ.pop("DPTRAIN_LAUNCH_TIME", None)
    os.environ.pop("DPTRAIN_LAUNCHED", None)
    os.environ.pop("DPTRAIN_FORKED", None)
    os.environ.pop("DPTRAIN_OUT_LOCKED", None)
    yield
    os.chdir(saved_cwd)
    os.environ.clear()
    os.environ.update(saved)
    changes = changed_paths(listed, checkout_listing())
    if changes:
        pytest.fail(f"the tests changed the checkout {REPO}: {changes}; a test must write "
                    "only below its tmp_path (or the session's working folder)", pytrace=False)


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m dptrain ARGS`, as a user would run it (from the session's working folder, not
    the checkout); output captured as text."""
    return subprocess.run([sys.executable, "-m", "dptrain", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def train(mode: str, out: Path, *args: str, nproc: int = 2) -> dict:
    """Run one training and return its summary; fails the test with the output on error."""
    launch = ["--nproc", str(nproc)] if mode != "seq" else []
    # The suite tests the CPU/gloo path, also on a machine with fewer GPUs than workers.
    result = run_cli(mode, *launch, "--device", "cpu", "--out", str(out), *args)
    assert result.returncode == 0, f"{mode} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads((out / "summary.json").read_text())


def load_state(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_parameters(a: dict, b: dict, *, atol: float = 1e-5) -> None:
    """Equal up to float32 round-off (the ranks sum partial gradients in another order)."""
    import torch

    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


def start_cli(*args: str, log: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    """`python -m dptrain ARGS` in the background, its output (both streams) into `log`.
    sigint_ignored: started as a shell script starts a background job (`dptrain seq &`)."""
    import signal

    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dptrain", *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=ignore)


def children(pid: int) -> list[int]:
    """The direct children of a process, from /proc (no psutil)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids) -> set[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def wait_for(predicate, timeout: float = 120, what: str = "a condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def metric_values(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    return [{k: v for k, v in json.loads(line).items()
             if not k.endswith("_seconds") and k != "samples_per_second"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_covers(phases: dict, epoch_seconds: float, skew: float = 0.0) -> None:
    """The phases (seconds, mean over ranks) add up to rank 0's epoch: they leave out only the
    loop's own few lines, and hold up to `skew` (the record's straggler_seconds) more: a rank
    that starts the epoch before rank 0 waits for it in the first sum (docs/DESIGN.md, the
    phase timers)."""
    assert all(seconds >= 0 for seconds in phases.values()), phases
    assert 0.85 * epoch_seconds <= sum(phases.values()) <= 1.05 * epoch_seconds + skew, \
        (sum(phases.values()), epoch_seconds, skew, phases)


def assert_identical_parameters(a: dict, b: dict) -> None:
    """Bit for bit: what an exact resume must give on the CPU."""
    import torch

    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max difference {(a[key] - b[key]).abs().max()}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 3-epoch seq run (about 90% test accuracy), trained once for every test that needs one."""
    out = tmp_path_factory.mktemp("trained") / "seq"
    train("seq", out, "--epochs", "3")
    return out


@pytest.fixture(scope="session")
def seq_one_epoch(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, summary) of `dptrain seq --epochs 1`, the default config otherwise: the
    reference of every 1-epoch comparison with the default config, trained once."""
    out = tmp_path_factory.mktemp("seq-one-epoch") / "seq"
    return out, train("seq", out, "--epochs", "1")
