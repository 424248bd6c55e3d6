"""How workers start (launch.py) and which device each rank takes (strategy.resolve_device)."""

import os

import pytest
import torch

from conftest import assert_same_parameters, load_state, train
from dptrain.config import build_config
from dptrain.errors import UserError
from dptrain.distributed.launch import worker_entry
from dptrain.distributed.strategy import DistEnv, resolve_device
from dptrain.worker import FORKED_ENV


@pytest.fixture
def one_gpu(monkeypatch):
    """A stand-in for a machine with one GPU (nothing here touches a real one)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("device, method, fresh", [
    ("cpu", "auto", False), ("cuda", "auto", True), ("auto", "auto", True),
    ("cpu", "fresh", True), ("cuda", "fork", False)])
def test_start_method_choices(one_gpu, monkeypatch, device, method, fresh):
    monkeypatch.setenv(FORKED_ENV, "")  # fork_workers sets it; restored after the test
    config = build_config({}, {"device": device, "start_method": method})
    assert (worker_entry("ddp", config) == ["-m", "dptrain.worker"]) == fresh
    assert bool(os.environ[FORKED_ENV]) != fresh


def test_cuda_workers_are_never_forked_from_a_launcher_that_initialized_cuda(one_gpu,
                                                                              monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    config = build_config({}, {"device": "cuda", "start_method": "fork"})
    with pytest.raises(RuntimeError, match="initialized CUDA"):
        worker_entry("ddp", config)


def test_gloo_ranks_share_a_gpu_and_nccl_ranks_do_not(one_gpu):
    second = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2)
    assert resolve_device("cuda", second, "gloo") == torch.device("cuda", 0)
    assert one_gpu == [0]
    for backend in ("nccl", "auto"):
        with pytest.raises(UserError, match="local rank 1 has no GPU.*--backend gloo"):
            resolve_device("cuda", second, backend)


def test_start_method_is_checked():
    with pytest.raises(UserError, match="launch.start_method"):
        build_config({}, {"start_method": "spawn"})


@pytest.mark.slow
def test_fresh_workers_train_the_same_model(tmp_path):
    """CPU runs fork by default; workers started afresh (as CUDA runs are) compute the same."""
    seq = train("seq", tmp_path / "seq", "--epochs", "1")
    fresh = train("ddp", tmp_path / "fresh", "--epochs", "1", "--start-method", "fresh")
    assert fresh["test_accuracy"] == pytest.approx(seq["test_accuracy"], abs=2e-4)
    assert_same_parameters(load_state(tmp_path / "seq"), load_state(tmp_path / "fresh"), atol=1e-4)
