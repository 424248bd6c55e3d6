"""How workers start (launch.py) and which device each rank takes (strategy.resolve_device)."""

import os

import pytest
import torch

from conftest import assert_same_parameters, load_state, train
from dptrain.distributed import launch
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
    # Whether this process may still fork CUDA workers depends on what earlier tests asked
    # CUDA in it; the fallback when it may not has its own tests below.
    monkeypatch.setattr(launch, "fork_poisoned", lambda: False)
    config = build_config({}, {"device": device, "start_method": method})
    assert (worker_entry("ddp", config) == ["-m", "dptrain.worker"]) == fresh
    assert bool(os.environ[FORKED_ENV]) != fresh


FORKED = ["--start-method=fork", "worker.py"]


@pytest.fixture
def cuda_questions(monkeypatch):
    """Stand-ins one level down, where torch asks: CUDA's own count (cudaGetDeviceCount, which
    poisons a fork of this process: a forked child is then 'in bad fork') answers
    answers["cuda"], NVML's answers answers["nvml"] (-1: NVML cannot answer). Returns the
    list of the CUDA questions asked, and the answers to change."""
    asked, answers = [], {"cuda": 1, "nvml": 1}

    def cuda_device_count():
        asked.append("cuda")
        return answers["cuda"]

    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", cuda_device_count, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_isInBadFork", lambda: "cuda" in asked, raising=False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: answers["nvml"])
    monkeypatch.delenv(launch.NVML_CHECK_ENV, raising=False)
    # Forking imports torch._dynamo (seconds); what it returns is all that matters here.
    monkeypatch.setenv(FORKED_ENV, "")
    monkeypatch.setattr(launch, "fork_workers",
                        lambda mode: os.environ.update({FORKED_ENV: "1"}) or FORKED)
    return asked, answers


def test_the_launcher_never_asks_cuda_itself_before_it_forks(cuda_questions, monkeypatch):
    """Not even where the user set PYTORCH_NVML_BASED_CUDA_CHECK=0, nor in torchrun."""
    from torch.distributed.launcher.api import LaunchConfig

    asked, _ = cuda_questions
    monkeypatch.setenv(launch.NVML_CHECK_ENV, "0")
    launch.ask_cuda_through_nvml()
    assert worker_entry("ddp", build_config({}, {"start_method": "fork"})) == FORKED
    LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1)  # what torchrun asks next
    assert asked == []


def test_forked_cuda_workers_start_fresh_where_nvml_cannot_answer(cuda_questions, capsys):
    asked, answers = cuda_questions
    answers["nvml"] = -1  # torch asks CUDA itself
    launch.ask_cuda_through_nvml()
    config = build_config({}, {"device": "cuda", "start_method": "fork"})
    assert worker_entry("ddp", config) == launch.FRESH
    assert asked == ["cuda"] and not os.environ.get(FORKED_ENV)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "starting the workers fresh instead" in lines[0], lines
    # No GPU after all: CPU workers, whom a poisoned fork cannot harm, are forked as ever.
    answers["cuda"] = 0
    assert worker_entry("ddp", build_config({}, {"start_method": "fork"})) == FORKED
    assert capsys.readouterr().err == ""


def test_every_mode_takes_the_device_cuda_can_run_not_the_one_nvml_sees(cuda_questions,
                                                                        monkeypatch):
    """NVML sees a GPU that CUDA cannot start (a driver too old for the wheel): the CPU, in
    seq's process and in a worker that inherited the launcher's setting alike."""
    _, answers = cuda_questions
    answers["cuda"] = 0
    assert resolve_device("auto", DistEnv()) == torch.device("cpu")
    monkeypatch.setenv(launch.NVML_CHECK_ENV, "1")  # a worker's environment
    assert torch.cuda.is_available()  # what torch says there, asked as it is set
    assert resolve_device("auto", DistEnv()) == torch.device("cpu")
    assert os.environ[launch.NVML_CHECK_ENV] == "1"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda", DistEnv())


def test_fp32_is_pinned_against_the_tf32_override_and_recorded(seq_one_epoch):
    """NVIDIA's containers set the override; torch then reads TF32 as on, until pinned off."""
    import subprocess
    import sys

    code = ("import torch; from dptrain.distributed.strategy import pin_fp32_precision; "
            "print(torch.backends.cuda.matmul.allow_tf32, pin_fp32_precision())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"})
    assert result.stdout.split() == ["True", "ieee"], result.stdout + result.stderr
    assert seq_one_epoch[1]["fp32_precision"] == "ieee"  # what a run records


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
def test_fresh_workers_train_the_same_model(tmp_path, seq_one_epoch):
    """CPU runs fork by default; workers started afresh (as CUDA runs are) compute the same."""
    seq_dir, seq = seq_one_epoch
    fresh = train("ddp", tmp_path / "fresh", "--epochs", "1", "--start-method", "fresh")
    assert fresh["test_accuracy"] == pytest.approx(seq["test_accuracy"], abs=2e-4)
    assert_same_parameters(load_state(seq_dir), load_state(tmp_path / "fresh"), atol=1e-4)
