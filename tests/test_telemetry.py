"""Telemetry (dptrain/telemetry/): the split of the collectives into work and waiting, one real
ddp run (gloo, 2 processes) with --profile and --tensorboard whose files are read back, the
line that names a stalled rank, and the progress line. The hang itself, in ddp and fsdp, is
test_reliability.py's hung-peer test."""

import io
import json
import re

import numpy as np
import pytest
from rich.console import Console

from conftest import assert_covers, train
from dptrain.config import ConfigError, build_config, resolve
from dptrain.errors import UserError
from dptrain.flags import config_from_flags, fill_optional_values
from dptrain.storage.runlog import RunLog
from dptrain.telemetry.hangs import read_heartbeats, stall_line
from dptrain.telemetry.phases import Layout, run_totals, split

DDP_PHASES = ["batch", "forward_backward", "sum", "wait", "optimizer", "epoch_end"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """ddp x2, 2 epochs of 10 updates, updates 2 to 6 profiled (--profile alone), TensorBoard."""
    out = tmp_path_factory.mktemp("telemetry") / "ddp"
    train("ddp", out, "--epochs", "2", "--batch-size", "4096", "--checkpoint-every", "0",
          "--profile", "--tensorboard")
    return out


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the split, on made-up numbers -----------------------------------------------------------

def test_the_last_rank_to_arrive_waits_for_nobody():
    """Per update, the smallest exposure to the sum is its work; the rest is waiting."""
    layout = Layout(updates=3)
    ms = 1e-3
    ranks = np.zeros((2, layout.size))
    sum_bins = slice(layout.kind("sum"), layout.kind("sum") + 3)
    # batch, forward_backward, optimizer, and the epoch's loss sum (rank 0 finished first)
    ranks[:, :4] = [[1 * ms, 20 * ms, 2 * ms, 2 * ms], [1 * ms, 22 * ms, 2 * ms, 1 * ms]]
    ranks[0, sum_bins] = [5 * ms, 1 * ms, 2 * ms]  # rank 0 arrived first at updates 1 and 2
    ranks[1, sum_bins] = [1 * ms, 1 * ms, 4 * ms]  # rank 1 at update 3
    fields = split(ranks, layout, {"sum"})
    fastest, mean, slowest = (fields["phase_seconds"][k] for k in ("fastest", "mean", "slowest"))
    assert list(mean) == DDP_PHASES
    assert slowest["sum"] == fastest["sum"] == pytest.approx(4 * ms)  # 1 + 1 + 2
    # Rank 1 waited 2 ms at update 3; rank 0 4 ms at update 1 and 1 at the epoch's end.
    assert (fastest["wait"], slowest["wait"]) == (pytest.approx(2 * ms), pytest.approx(5 * ms))
    # forward_backward is what is left of the timed block once the collective is taken out.
    assert (fastest["forward_backward"], slowest["forward_backward"]) == (
        pytest.approx(12 * ms), pytest.approx(16 * ms))
    assert fields["straggler_seconds"] == pytest.approx(4 * ms)  # update 1: 5 ms against 1
    assert mean["epoch_end"] == pytest.approx(1 * ms)  # the last rank there waited for nobody
    # Each rank's phases still add up to what it timed.
    totals = run_totals([{"epoch": 1, **fields}, {"epoch": 2, **fields}])
    assert totals["phase_seconds"]["mean"]["wait"] == pytest.approx(7 * ms)
    assert totals["straggler_seconds"] == fields["straggler_seconds"]


def test_a_stalled_rank_is_named_with_where_the_others_waited():
    beats = {0: {"epoch": 3, "update": 18, "phase": "sum", "time": 100.0},
             1: {"epoch": 3, "update": 17, "phase": "forward_backward", "time": 69.0},
             2: {"epoch": 3, "update": 18, "phase": "sum", "time": 99.5}}
    assert stall_line(0, 3, 30.0, beats, now=100.2) == (
        "rank 1 stopped at epoch 3, update 17 (forward/backward) 31 s ago; "
        "ranks 0, 2 waited in the gradient sum")
    fresh = {**beats, 1: {**beats[1], "time": 99.9}}
    assert stall_line(0, 3, 30.0, fresh, now=100.2) == (
        "every rank was still beating (ranks 0, 2 were in the gradient sum; rank 1 was in "
        "forward/backward): the timeout is too short for the work, or the ranks are in "
        "different collectives")
    assert stall_line(0, 3, 30.0, {}, now=100.2) == ""  # the store did not answer


def test_a_store_that_is_gone_reads_as_nothing_without_a_word(monkeypatch, capfd):
    """A peer reads the heartbeats while rank 0, the store's host, has ended: its client's
    retries logged C++ backtraces, 29 lines around the failure's one (a flaky CI run)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert read_heartbeats(2, timeout_s=0.5) == {}
    assert capfd.readouterr().err == ""


# --- one real ddp run --------------------------------------------------------------------------

@pytest.mark.slow
def test_phases_cover_every_epoch_and_add_up_in_the_summary(profiled):
    epochs = records(profiled)
    for record in epochs:
        phases = record["phase_seconds"]
        assert list(phases["mean"]) == DDP_PHASES
        for name in DDP_PHASES:
            assert phases["fastest"][name] <= phases["mean"][name] <= phases["slowest"][name]
        assert record["straggler_seconds"] >= 0
    # Epoch 1 also holds the profiler's start and its trace export, which are no phase.
    assert sum(epochs[0]["phase_seconds"]["mean"].values()) <= 1.05 * epochs[0]["epoch_seconds"]
    assert_covers(epochs[1]["phase_seconds"]["mean"], epochs[1]["epoch_seconds"],
                  epochs[1]["straggler_seconds"])
    summary = json.loads((profiled / "summary.json").read_text())
    assert summary["phase_seconds"] == run_totals(epochs)["phase_seconds"]
    assert summary["straggler_seconds"] == max(r["straggler_seconds"] for r in epochs)
    assert summary["val_seconds"] == pytest.approx(sum(r["val_seconds"] for r in epochs))


@pytest.mark.slow
def test_profile_writes_one_chrome_trace_per_rank_with_the_phases(profiled):
    for rank in (0, 1):
        trace = json.loads((profiled / "profile" / f"rank{rank}.pt.trace.json").read_text())
        spans = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"]
        # --profile alone is 1:5: updates 2 to 6, each with its phases and its gradient sum
        # (the optimizer's two: its lr and cleared gradients, then its step).
        for phase, count in (("batch", 5), ("forward_backward", 5), ("sum", 5),
                             ("optimizer", 10)):
            assert spans.count(phase) == count, (rank, phase, spans.count(phase))
        assert any(name.startswith("aten::") for name in spans)  # torch's own ops too


@pytest.mark.slow
def test_tensorboard_holds_every_number_of_the_records_and_the_config(profiled):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(profiled / "tensorboard"))
    events.Reload()
    epochs = records(profiled)
    for tag in ("train_loss", "val_accuracy", "lr", "samples_per_second",
                "phase_seconds/mean/wait", "phase_seconds/slowest/sum"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag
        path = tag.split("/")
        expected = [r[path[0]] if len(path) == 1 else r[path[0]][path[1]][path[2]] for r in epochs]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6), tag
    (config,) = events.Tensors("config/text_summary")
    assert "[optim]" in config.tensor_proto.string_val[0].decode()
    # Rank 0 alone writes it.
    assert len(list((profiled / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_seq_run_times_its_phases(trained_run):
    for record in records(trained_run):
        assert list(record["phase_seconds"]["mean"]) == ["batch", "forward_backward", "optimizer",
                                                         "epoch_end"]
        assert record["straggler_seconds"] == 0
        assert_covers(record["phase_seconds"]["mean"], record["epoch_seconds"])


# --- flags -----------------------------------------------------------------------------------

def test_profile_alone_takes_the_default_window():
    assert fill_optional_values(["ddp", "--profile", "--epochs", "2"]) == [
        "ddp", "--profile=1:5", "--epochs", "2"]
    assert fill_optional_values(["seq", "--profile"]) == ["seq", "--profile=1:5"]
    assert fill_optional_values(["seq", "--profile", "3:2"]) == ["seq", "--profile", "3:2"]


def test_a_profile_window_must_be_start_count_within_the_run():
    for bad in ("5", "5:0", "a:b", "-1:3"):
        with pytest.raises(ConfigError, match="run.profile: expected START:COUNT"):
            build_config({}, {"profile": bad})
    config = build_config({}, {"profile": "90:5", "epochs": 2, "full_batch": True})
    with pytest.raises(ConfigError, match=r"starts after the run's last update \(it makes 2: "):
        resolve(config, mode="seq", world_size=1, n_train=42000)


def test_tensorboard_without_the_package_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r'pip install -e "\.\[tensorboard\]"'):
        config_from_flags({"tensorboard": True})


# --- the progress line -----------------------------------------------------------------------

def record(epoch):
    return {"epoch": epoch, "train_loss": 0.2134, "val_loss": 0.2234, "val_accuracy": 0.9412,
            "lr": 0.01, "epoch_seconds": 0.048, "samples_per_second": 873512.0}


def test_the_progress_bar_fits_80_columns_with_the_epoch_rate_and_time_left(tmp_path):
    log = RunLog(tmp_path / "run", active=True)
    buffer = io.StringIO()
    log.console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    log.start("", [], {"epochs": 25})
    for epoch in (1, 2):
        log.epoch(record(epoch))
    log.close()
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).replace("\r", "\n")
    last = [line for line in lines.splitlines() if line.startswith("epoch")][-1]
    assert len(last) <= 80 and re.search(r"epoch +2/25 .* \d+:\d\d +874k samples/s +val_acc", last), last


def test_a_log_line_carries_samples_per_second(tmp_path):
    log = RunLog(tmp_path / "run", active=True)
    buffer = io.StringIO()
    log.console = Console(file=buffer, width=1000, highlight=False)
    log.start("", [], {"epochs": 25})
    log.epoch(record(1))
    log.close()
    assert buffer.getvalue().splitlines()[-1].endswith("0.05s  874k samples/s")
