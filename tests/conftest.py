"""Shared helpers: the real MNIST folder, a tiny IDX writer, a free port, and CLI runners."""

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

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("DPTRAIN_DATA_DIR") or REPO.parent / "shared" / "data" / "mnist")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Real MNIST from shared/, a private decode cache, and no way to reach a real mirror."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.exit(f"MNIST not found at {MNIST_DIR}; set DPTRAIN_DATA_DIR", returncode=2)
    saved = dict(os.environ)
    os.environ["DPTRAIN_DATA_DIR"] = str(MNIST_DIR.resolve())
    os.environ["DPTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["DPTRAIN_MNIST_MIRRORS"] = "http://127.0.0.1:9/unreachable/"
    os.environ.pop("DPTRAIN_LAUNCH_TIME", None)
    os.environ.pop("DPTRAIN_LAUNCHED", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
    """`python -m dptrain ARGS`, as a user would run it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "dptrain", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 3-epoch seq run (about 90% test accuracy), trained once for every test that needs one."""
    out = tmp_path_factory.mktemp("trained") / "seq"
    train("seq", out, "--epochs", "3")
    return out
