"""Console output and the command's clock: in-process, no training."""

import io
import time

from dptrain.storage.runlog import LAUNCH_TIME_ENV, command_start_time, make_console


def test_a_log_console_never_wraps():
    # A sweep's closing hint, say: a command the user copies must stay on one line.
    buffer = io.StringIO()  # not a terminal, as a redirect, a sweep's *.log or SLURM's output
    hint = "results in runs/study/" + "c" * 120 + " (sweep.csv); figures: dptrain report runs/x"
    make_console(file=buffer, highlight=False).print(hint)
    assert buffer.getvalue() == hint + "\n"


def test_command_start_time_is_this_process_start_to_a_tick(monkeypatch):
    monkeypatch.delenv(LAUNCH_TIME_ENV, raising=False)
    started = command_start_time()
    assert started <= time.time()
    # pytest's process started before this test, and not before the machine booted.
    uptime = float(open("/proc/uptime").read().split()[0])
    assert time.time() - uptime < started < time.time() - 0.05
    assert abs(command_start_time() - started) < 0.02  # the same reading each time
    monkeypatch.setenv(LAUNCH_TIME_ENV, "1234.5")  # a worker: the CLI's start, handed down
    assert command_start_time() == 1234.5


def test_run_files_read_back_are_bounded_and_never_block(tmp_path):
    """summary.json, metrics.jsonl and stopped.json from a folder anyone may have edited: a
    FIFO, a link to /dev/zero or a huge file is refused, never waited on or read whole."""
    import os

    import pytest

    from dptrain.errors import UserError
    from dptrain.storage import runlog
    from dptrain.study.plots import read_run

    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "metrics.jsonl", "stopped.json"):
        os.mkfifo(run / name)  # opened for reading, a FIFO would wait for a writer forever
    assert runlog.read_json(run / "summary.json") is None
    assert runlog.read_records(run / "metrics.jsonl") == []
    assert runlog.stopped_message(run) == ""
    with pytest.raises(UserError, match="not a run's summary"):
        read_run(run)
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="not a run's summary"):
        runlog.read_summary(run)
    (run / "summary.json").unlink()
    (run / "summary.json").write_text("[" * 100_000)  # nested past any parser's stack
    assert runlog.read_json(run / "summary.json") is None
    (run / "summary.json").write_text('{"mode": "seq", "pad": "' + "x" * 2_000 + '"}')
    assert runlog.read_json(run / "summary.json", limit=1_000) is None
    assert runlog.read_json(run / "summary.json")["mode"] == "seq"
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1}\n{"epoch": 2, "tr')
    assert runlog.read_records(run / "metrics.jsonl") == [{"epoch": 1, "train_loss": 1}]
