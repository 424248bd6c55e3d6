"""Reliability on real workers: exact resume, a killed worker, Ctrl-C, a hung peer, NaN, two
runs at once, and checkpoint export.

Each mode has one reference run that is never interrupted; every interrupted run must end with
exactly its parameters (torch.equal) and its per-epoch metrics. Per-mode batches give each
epoch about a second here, so that a signal sent once epoch 1's checkpoint exists lands mid-run.
"""

import json
import os
import re
import shutil
import signal
import time

import pytest

from conftest import (alive, assert_covers, assert_identical_parameters, assert_same_parameters,
                      descendants, load_state, metric_values, run_cli, start_cli, train, wait_for)
from test_cli import assert_one_line_error

# ddp reads the noise scale at every update: its epochs' first updates take the tap's
# per-parameter path (components/noise.py: BucketTap), which exact resume must also keep.
FLAGS = {"seq": ["--batch-size", "1024", "--epochs", "3"],
         "ddp": ["--batch-size", "256", "--epochs", "3", "--noise-every", "1"],
         "fsdp": ["--batch-size", "1024", "--epochs", "3"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trained_run):
    """mode -> the folder of an uninterrupted run (made on first use; seq's is the session's
    trained_run, which has the same config)."""
    root, made = tmp_path_factory.mktemp("reference"), {"seq": trained_run}

    def get(mode):
        if mode not in made:
            train(mode, root / mode, *FLAGS[mode])
            made[mode] = root / mode
        return made[mode]

    return get


def assert_same_run(run_dir, reference_dir):
    assert_identical_parameters(load_state(reference_dir), load_state(run_dir))
    assert metric_values(run_dir) == metric_values(reference_dir)


def checkpoint_exists(out, epoch=1):
    return lambda: (out / "checkpoints" / f"epoch-{epoch:04d}" / "meta.json").exists()


def launch(mode, out, *args, log):
    launch_flags = ["--nproc", "2"] if mode != "seq" else []
    return start_cli(mode, *launch_flags, "--device", "cpu", "--out", str(out),
                     *FLAGS[mode], *args, log=log)


def watch(process, until):
    """Record the process's descendants until `until()` holds; returns them."""
    seen = set()
    wait_for(lambda: seen.update(descendants(process.pid)) or until() or process.poll() is not None,
             what="the run to reach its first checkpoint")
    assert process.poll() is None, "the run ended before it could be interrupted"
    seen.update(descendants(process.pid))
    return seen


@pytest.mark.slow
def test_seq_resume_is_exact(tmp_path, reference):
    """Stopped after epoch 1 (a run of 1 epoch), continued to 3: the uninterrupted run."""
    out = tmp_path / "run"
    train("seq", out, *FLAGS["seq"], "--epochs", "1")
    result = run_cli("seq", "--resume", str(out), "--epochs", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"resuming from {out}/checkpoints/epoch-0001 (epoch 1 of 3)" in result.stdout
    assert_same_run(out, reference("seq"))
    assert [m["epoch"] for m in metric_values(out)] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("mode, sig", [("ddp", signal.SIGINT), ("fsdp", signal.SIGTERM)])
def test_signal_stops_everything_then_resume_is_exact(tmp_path, reference, mode, sig):
    out = tmp_path / "run"
    process = launch(mode, out, log=tmp_path / "log")
    workers = watch(process, checkpoint_exists(out))
    sent = time.monotonic()
    process.send_signal(sig)
    process.wait(timeout=30)
    assert time.monotonic() - sent < 10
    output = (tmp_path / "log").read_text()
    assert process.returncode == 128 + sig, output
    errors = [line for line in output.splitlines() if line.startswith("dptrain: error:")]
    assert len(errors) == 1 and f"stopped by signal {sig.name}" in errors[0], output
    assert "Traceback" not in output
    assert alive(workers) == set(), "orphan processes"
    assert not (out / "summary.json").exists()
    # Epoch 1's line may be missing (a stop just after its checkpoint): the resume restores it.
    assert len(metric_values(out)) < 3

    shutil.copytree(out, tmp_path / "copy")  # for the reshard test below
    result = run_cli(mode, "--nproc", "2", "--device", "cpu", "--resume", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(out, reference(mode))
    assert [m["epoch"] for m in metric_values(out)] == [1, 2, 3]
    if mode == "fsdp":  # the same checkpoint, resharded onto one rank: equal up to round-off
        result = run_cli(mode, "--nproc", "1", "--device", "cpu", "--resume",
                         str(tmp_path / "copy"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert_same_parameters(load_state(reference(mode)), load_state(tmp_path / "copy"))
        assert json.loads((tmp_path / "copy" / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_sigint_stops_a_background_seq_and_sweep_as_it_stops_ddp(tmp_path):
    """A script's `dptrain seq &` or `dptrain sweep &` starts with SIGINT ignored; `kill -INT`
    stops it all the same: one line, exit status 130, the sweep's run stopped with it."""
    seq_out, sweep_out = tmp_path / "seq", tmp_path / "sweep"
    many = ["--epochs", "100", "--device", "cpu"]
    seq = start_cli("seq", "--out", str(seq_out), *many, log=tmp_path / "seq.log",
                    sigint_ignored=True)
    sweep = start_cli("sweep", "--mode", "seq", "--out", str(sweep_out), *many,
                      log=tmp_path / "sweep.log", sigint_ignored=True)
    started = {}
    for process, out in ((seq, seq_out), (sweep, sweep_out / "seq-1")):
        started[process.pid] = watch(process, checkpoint_exists(out))
        process.send_signal(signal.SIGINT)
    for process, log, said in ((seq, "seq.log", "stopped by signal SIGINT"),
                               (sweep, "sweep.log", "interrupted")):
        process.wait(timeout=30)
        output = (tmp_path / log).read_text()
        assert process.returncode == 128 + signal.SIGINT, output
        errors = [line for line in output.splitlines() if line.startswith("dptrain: error:")]
        assert len(errors) == 1 and said in errors[0], output
        assert "Traceback" not in output
        assert alive(started[process.pid]) == set(), "orphan processes"
    # The sweep stopped its run, which stopped as a run does, naming its checkpoint.
    assert "; the last complete checkpoint is" in (sweep_out / "seq-1.log").read_text()
    assert "continue with `dptrain sweep --resume" in (tmp_path / "sweep.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_worker_restarts_from_the_checkpoint(tmp_path, reference, mode):
    out = tmp_path / "run"
    process = launch(mode, out, "--max-restarts", "1", log=tmp_path / "log")
    workers = watch(process, checkpoint_exists(out))
    rank1 = sorted(set(descendants(process.pid)) & workers)[-1]
    os.kill(rank1, signal.SIGKILL)
    process.wait(timeout=120)
    output = (tmp_path / "log").read_text()
    assert process.returncode == 0, output
    assert "after a worker failure (restart 1)" in output
    assert json.loads((out / "summary.json").read_text())["restarts"] == 1
    assert_same_run(out, reference(mode))
    assert alive(workers) == set()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_hung_peer_ends_the_job_within_the_timeout_naming_it(tmp_path, mode):
    """A SIGSTOP'ed rank stops its heartbeat; the rank that times out names it, and where it
    waited itself (telemetry/hangs.py)."""
    out = tmp_path / "run"
    process = start_cli(mode, "--nproc", "2", "--device", "cpu", "--out", str(out),
                        "--batch-size", "256", "--epochs", "50", "--timeout", "3",
                        log=tmp_path / "log")
    metrics = out / "metrics.jsonl"  # epoch 1's record follows its checkpoint
    workers = watch(process, lambda: metrics.exists() and metrics.read_text().endswith("\n"))
    # The two workers: the descendants still running (short-lived helpers, such as a
    # library's probe of the system at import, have lower pids and are gone by now).
    running = alive(workers)
    assert len(running) == 2, running
    rank0, rank1 = sorted(running)
    try:
        # Stays stopped: torchrun's SIGTERM cannot end it. Its heartbeat has beaten at epoch 1's
        # start (telemetry.begin_epoch), an epoch before the record we waited for.
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: not alive([rank0]), timeout=60, what="rank 0 to time out")
        timed_out = time.monotonic()
        assert timed_out - stopped < 3 + 15
        process.wait(timeout=60)
        # torchrun's agent gives the stopped rank launch.STOP_GRACE_SECONDS (5), then SIGKILL;
        # it waited 30 s, whatever its shutdown timeout said.
        assert time.monotonic() - timed_out < 5 + 12
    finally:
        if alive([rank1]):
            os.kill(rank1, signal.SIGCONT)
    output = (tmp_path / "log").read_text()
    assert process.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("dptrain: error:")]
    assert len(errors) == 1 and "timed out (--timeout 3 s)" in errors[0], output
    # e.g. "rank 1 stopped at epoch 2, update 17 (forward/backward) 6 s ago; rank 0 waited in
    # the gradient sum"
    assert re.search(r"rank 1 stopped at epoch \d+, update \d+ \([^)]+\) \d+ s ago; "
                     r"rank 0 waited in ", errors[0]), errors[0]
    assert alive(workers) == set()
    assert list((out / "checkpoints").glob("epoch-*"))  # the newest --keep survive the hang
    # Epoch 1's record, from both ranks: the phases of the mode, which cover the epoch.
    record = json.loads(metrics.read_text().splitlines()[0])
    phases = record["phase_seconds"]["mean"]
    gather = [] if mode == "ddp" else ["gather"]
    assert list(phases) == ["batch", "forward_backward", *gather, "sum", "wait", "optimizer",
                            "epoch_end"]
    assert_covers(phases, record["epoch_seconds"], record["straggler_seconds"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])  # seq: test_checkpoint.py, in-process
def test_nan_loss_is_one_line_naming_epoch_and_step(tmp_path, mode):
    args = ["--nproc", "2"] if mode != "seq" else []
    result = run_cli(mode, *args, "--device", "cpu", "--out", str(tmp_path / "run"),
                     "--optimizer", "sgd", "--lr", "1e6", "--batch-size", "4096")
    assert_one_line_error(result, "became non-finite", "at epoch 1, step ",
                          "no checkpoint was written")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_diverged_run_is_not_retried_by_max_restarts(tmp_path):
    """torchrun restarts workers after any failure; a divergence would only recur, so the
    restarted attempts stop at once with its message (the plan is printed once)."""
    out = tmp_path / "run"
    result = run_cli("ddp", "--nproc", "2", "--device", "cpu", "--out", str(out), "--optimizer",
                     "sgd", "--lr", "1e6", "--batch-size", "4096", "--max-restarts", "2")
    assert_one_line_error(result, "became non-finite", "at epoch 1, step ")
    assert result.stdout.count("dptrain mode=ddp") == 1, result.stdout
    assert "became non-finite" in json.loads((out / "stopped.json").read_text())["message"]
    # A fresh run in the folder clears the record.
    train("ddp", out, "--force", "--epochs", "1", "--batch-size", "4096")
    assert not (out / "stopped.json").exists()


@pytest.mark.slow
def test_two_runs_started_together_both_succeed(tmp_path):
    runs = [start_cli("ddp", "--nproc", "2", "--device", "cpu", "--out", str(tmp_path / f"r{i}"),
                      "--epochs", "1", "--batch-size", "4096", log=tmp_path / f"log{i}")
            for i in range(2)]
    for i, process in enumerate(runs):
        assert process.wait(timeout=180) == 0, (tmp_path / f"log{i}").read_text()
    assert_identical_parameters(load_state(tmp_path / "r0"), load_state(tmp_path / "r1"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["seq", "fsdp"])
def test_export_equals_the_runs_model(tmp_path, reference, mode):
    run_dir = reference(mode)
    exported = tmp_path / "model.pt"
    result = run_cli("export", str(run_dir), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "checkpoints/epoch-0003" in result.stdout
    assert_identical_parameters(load_state(run_dir), {**load_state_file(exported)})
    assert_one_line_error(run_cli("export", str(run_dir), "--out", str(exported)), "exists")


def load_state_file(path):
    import torch

    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_says_so(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference("seq"), out)
    state = out / "checkpoints" / "epoch-0003" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    result = run_cli("seq", "--resume", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "falling back" in line]
    assert len(warnings) == 1 and "epoch-0003" in warnings[0], result.stdout
    assert "resuming from" in result.stdout and "epoch-0002 (epoch 2 of 3)" in result.stdout
    assert_same_run(out, reference("seq"))


@pytest.mark.slow
def test_fsdp_shards_and_every_run_file_honour_the_umask(reference):
    """One rule for every file, the user's umask: DCP's shards were 0644 while the run files
    that went through a temporary file were 0600."""
    from dptrain.storage.runlog import umask

    files = [p for p in reference("fsdp").rglob("*") if p.is_file()]
    assert any(p.suffix == ".distcp" for p in files) and any(p.name == ".metadata" for p in files)
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p): oct(0o666 & ~umask()) for p in files}
