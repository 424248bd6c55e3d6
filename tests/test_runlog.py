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
