"""The run folder: one run owns it while it runs (a lock), a full disk or an unwritable folder is
one line, files honour the umask, and nothing is written or deleted outside --out.

In-process seq runs cover each file a run writes; real workers (gloo, 2 processes) cover the
lock of the launcher and a real full disk (a small tmpfs, where this machine lets the test
mount one) for ddp and fsdp.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, assert_identical_parameters, load_state, run_cli, start_cli
from test_cli import assert_one_line_error
from dptrain.storage import checkpoint
from dptrain.storage import runlog
from dptrain.config import build_config
from dptrain.errors import UserError
from dptrain.storage.runlog import RunLock, write_atomic


def seq_config(out, epochs=2, **flags):
    # One thread: two are ten times slower beside the other busy processes of a 2-core machine.
    return build_config({}, {"epochs": epochs, "batch_size": 4096, "device": "cpu",
                             "threads": 1, "out": str(out), **flags})


def run_seq(out, epochs=2, **kwargs):
    """A seq run in this process (10 updates an epoch); returns its summary."""
    from dptrain.worker import run

    return run("seq", seq_config(out, epochs), **kwargs)


def run_seq_error(out, epochs=2, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        run_seq(out, epochs, **kwargs)
    return str(e.value)


# --- permissions -----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_write_atomic_gives_the_mode_of_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "f", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_every_file_of_a_run_honours_the_umask(trained_run):
    """config, metrics, summary, model.pt, state.pt, meta.json: not the 0600 of a temp file."""
    mask = runlog.umask()
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.toml", "metrics.jsonl", "summary.json", "model.pt",
                                       "state.pt", "meta.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~mask) for p in files}


# --- the lock --------------------------------------------------------------------------------

def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    held = RunLock(tmp_path / "run")
    held.acquire()
    try:
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
        # The seq run of this process (rank 0 of one) asks for it too, before writing anything.
        assert "is in use by another run" in run_seq_error(tmp_path / "run")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [runlog.LOCK]
    finally:
        held.release()
    again = RunLock(tmp_path / "run")
    again.acquire()
    again.release()


def test_the_lock_of_a_killed_run_is_gone_with_it(tmp_path):
    code = ("import sys, time; from dptrain.storage.runlog import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"\(pid {holder.pid} on "):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    summary = run_seq(tmp_path / "run", epochs=1)
    assert summary["epochs"] == 1


def finished_as(out, epochs):
    """Every file of the folder comes from the run of `epochs` epochs."""
    summary = json.loads((out / "summary.json").read_text())
    config = (out / "config.toml").read_text()
    found, _ = checkpoint.latest(out)
    assert summary["epochs"] == epochs and f"epochs = {epochs}\n" in config
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            ] == list(range(1, epochs + 1))
    assert found.epoch == epochs
    assert set(load_state(out)) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


@pytest.mark.slow
@pytest.mark.parametrize("modes", [("seq", "seq"), ("ddp", "seq")])
def test_two_runs_started_together_into_one_folder(tmp_path, modes):
    """The first to lock the folder runs; the other stops at once, naming it. Before the lock
    both exited 0 and left a folder mixed from the two. (The runs differ in --epochs, so the
    folder tells whose its files are.) Also: the ddp launch leaves no scratch in $TMPDIR."""
    out, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    os.environ["TMPDIR"] = str(scratch)  # the children's, restored by the session fixture
    try:
        runs = [start_cli(mode, *(["--nproc", "2"] if mode != "seq" else []), "--device", "cpu",
                          "--out", str(out), "--epochs", str(epochs), "--batch-size", "4096",
                          log=tmp_path / f"log{epochs}")
                for epochs, mode in enumerate(modes, start=1)]
    finally:
        del os.environ["TMPDIR"]
    codes = [process.wait(timeout=300) for process in runs]
    logs = [(tmp_path / f"log{epochs}").read_text() for epochs in (1, 2)]
    assert sorted(codes) == [0, 2], logs
    winner = codes.index(0)
    loser_errors = [line for line in logs[1 - winner].splitlines() if "error" in line]
    assert len(loser_errors) == 1, logs[1 - winner]
    assert "Traceback" not in logs[1 - winner]
    # Started at the same moment, the loser meets the lock; had the winner finished first,
    # the loser would be refused for the finished run instead (also one line).
    assert (f"is in use by another run (pid {runs[winner].pid} on " in loser_errors[0]
            or "already holds a finished run" in loser_errors[0]), loser_errors[0]
    finished_as(out, epochs=winner + 1)
    assert [p.name for p in scratch.iterdir()
            if p.name.startswith(("torchelastic_", "dptrain-"))] == []


# --- a full disk, and other files that cannot be written --------------------------------------

class WriteFails:
    """A stand-in for a full disk: writes raise ENOSPC from the n-th time one run file is written
    (metrics.jsonl: its n-th line) on."""

    def __init__(self, monkeypatch, name, nth=1):
        real_init, real_open, count = runlog._WriteErrors.__init__, open, [0]

        class Failing:
            def __init__(self, file):
                self.file = file
                count[0] += 1
                self.full = count[0] >= nth

            def write(self, data):
                if self.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.file.write(data)

            def __getattr__(self, attr):
                return getattr(self.file, attr)

        class FailingLines(Failing):
            def __init__(self, file):
                self.file, self.full = file, False

            def write(self, data):
                count[0] += 1
                self.full = count[0] >= nth
                return super().write(data)

        def init(wrapper, file):  # write_atomic's file, known by its temporary name
            target = os.path.basename(file.name).startswith(f".{name}.")
            real_init(wrapper, Failing(file) if target else file)

        def open_(path, *args, **kwargs):  # metrics.jsonl, appended line by line
            file = real_open(path, *args, **kwargs)
            return FailingLines(file) if os.path.basename(path) == name else file

        monkeypatch.setattr(runlog._WriteErrors, "__init__", init)
        monkeypatch.setattr(runlog, "open", open_, raising=False)


@pytest.mark.parametrize("name, nth, checkpoints", [
    ("config.toml", 1, []),
    ("metrics.jsonl", 2, ["epoch-0001"]),  # epoch 2's line
    ("state.pt", 2, ["epoch-0001"]),  # epoch 2's checkpoint
    ("meta.json", 2, ["epoch-0001"]),
    ("model.pt", 1, ["epoch-0001", "epoch-0002"]),
    ("summary.json", 1, ["epoch-0001", "epoch-0002"]),
])
def test_a_full_disk_is_one_line_for_every_file(tmp_path, monkeypatch, name, nth, checkpoints):
    out = tmp_path / "run"
    WriteFails(monkeypatch, name, nth)
    message = run_seq_error(out)
    assert message.startswith("cannot write ") and "no space left on device" in message, message
    assert f"{out}/" in message and name in message.split(";")[0]
    assert sorted(p.name for p in out.glob("checkpoints/*")) == checkpoints
    assert [p.name for p in out.rglob(".*") if p.name != runlog.LOCK] == []  # no temp files
    if checkpoints:
        assert f"the last complete checkpoint is {out}/checkpoints/{checkpoints[-1]}: make room, " \
               f"then --resume {out}" in message
    else:
        assert "no checkpoint was written" in message


def test_after_a_full_disk_the_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_seq(reference, epochs=3)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        WriteFails(patch, "state.pt", nth=2)
        run_seq_error(out, epochs=3)
    from dptrain.worker import run

    config = checkpoint.resume_config("seq", out, {"epochs": 3, "device": "cpu", "threads": 1})
    run("seq", config, resume=str(out))
    assert_identical_parameters(load_state(reference), load_state(out))


def test_a_full_disk_in_an_fsdp_checkpoint_is_one_line(tmp_path, monkeypatch):
    """DCP wraps the writer's OSError in its own CheckpointException (one rank, in-process)."""
    import torch
    import torch.distributed as dist

    from dptrain.config import SystemConfig
    from dptrain.components.model import MLP
    from dptrain.distributed.strategy import DistEnv, FSDPStrategy
    from dptrain.components.step import make_optimizer
    from test_checkpoint import CONFIG, PLAN

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        strategy = FSDPStrategy(DistEnv(), torch.device("cpu"), "gloo", SystemConfig(device="cpu"))
        model = strategy.wrap(MLP())
        optimizer = make_optimizer(CONFIG.optim, model.parameters(), 0.01)
        meta = checkpoint.manifest(epoch=1, step=10, mode="fsdp", world_size=1, config=CONFIG,
                                   plan=PLAN, records=[{"epoch": 1}], train_seconds=1.0,
                                   checkpoint_format="dcp")
        monkeypatch.setattr(os, "fsync", no_space)  # DCP syncs each file it writes
        with pytest.raises(runlog.StorageError, match="no space left on device") as e:
            checkpoint.write(strategy, model, optimizer, tmp_path, meta, keep=2)
    finally:
        dist.destroy_process_group()
    assert f"cannot write checkpoint {tmp_path}/checkpoints/epoch-0001" in str(e.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .epoch-0001.tmp


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs (room for one checkpoint, not two), where this machine lets us mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                                 capture_output=True, check=False).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the stand-in tests cover ENOSPC")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["seq", "ddp", "fsdp"])
def test_a_real_full_disk_on_every_mode(small_disk, mode):
    """seq in this process (the CLI's path for it), ddp and fsdp on 2 workers."""
    out = small_disk / "run"
    fragments = (f"cannot write checkpoint {out}/checkpoints/epoch-0002",
                 "no space left on device", f"--resume {out}")
    if mode == "seq":
        message = run_seq_error(out, epochs=3)
        assert all(fragment in message for fragment in fragments), message
    else:
        result = run_cli(mode, "--nproc", "2", "--device", "cpu", "--out", str(out), "--epochs",
                         "3", "--batch-size", "4096")
        assert_one_line_error(result, *fragments)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]
    found, skipped = checkpoint.latest(out)
    assert found.epoch == 1 and skipped == []


# --- folders that cannot be written, and symbolic links --------------------------------------

def test_an_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for out, reason in ((tmp_path / "file" / "run", "a part of the path is a file"),
                        ("/proc/dptrain-run", "cannot create the run folder")):
        with pytest.raises(UserError, match=reason):
            run_seq(out, epochs=1)


@pytest.mark.slow
def test_an_unwritable_out_of_ddp_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli("ddp", "--nproc", "2", "--device", "cpu", "--out", str(tmp_path / "file" / "r"))
    assert_one_line_error(result, "cannot create the run folder", "a part of the path is a file")


def test_force_replaces_a_linked_checkpoints_folder_and_leaves_its_target(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (elsewhere / "epoch-0001").mkdir(parents=True)
    (elsewhere / "keep-me").write_text("not dptrain's")
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    run_seq(out, epochs=1, force=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["epoch-0001", "keep-me"]
    assert not (out / "checkpoints").is_symlink()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]


def test_resume_through_a_linked_checkpoints_folder_is_refused(tmp_path, trained_run):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(trained_run, out)
    shutil.move(out / "checkpoints", elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    from dptrain.worker import run

    config = checkpoint.resume_config("seq", out, {"epochs": 4, "device": "cpu", "threads": 1})
    with pytest.raises(UserError, match="is a symbolic link"):
        run("seq", config, resume=str(out))
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert (out / "summary.json").exists() and (out / "model.pt").exists()


# --- what a run may delete: only an earlier run's files --------------------------------------

def test_a_fresh_run_never_deletes_files_it_did_not_write(tmp_path):
    """A model.pt and a checkpoints/best/ of the user's own were deleted by a fresh run, exit 0;
    now they are refused in one line, with --force too. What a run never touches stays."""
    out = tmp_path / "run"
    (out / "checkpoints" / "best").mkdir(parents=True)
    (out / "checkpoints" / "best" / "weights.bin").write_bytes(b"mine")
    (out / "model.pt").write_bytes(b"my model")
    (out / "notes.txt").write_text("kept")
    for force in (False, True):
        message = run_seq_error(out, epochs=1, force=force)
        assert "model.pt, checkpoints/best/weights.bin, which dptrain did not write" in message, \
            message
        assert "even with --force" in message
    assert (out / "model.pt").read_bytes() == b"my model"
    assert (out / "checkpoints" / "best" / "weights.bin").read_bytes() == b"mine"

    # Moved away, the run goes on beside notes.txt; a rerun may replace what it wrote, its
    # best checkpoint included, but not a foreign folder added since.
    (out / "model.pt").unlink()
    shutil.rmtree(out / "checkpoints")
    from dptrain.worker import run

    run("seq", seq_config(out, 1, keep_best=True))
    assert (out / "checkpoints" / "best" / "epoch-0001" / "meta.json").exists()
    (out / "checkpoints" / ".epoch-0002.tmp").mkdir()  # a crashed write's
    (out / "checkpoints" / "mine").mkdir()
    assert "checkpoints/mine, which dptrain did not write" in run_seq_error(out, 1, force=True)
    (out / "checkpoints" / "mine").rmdir()
    run_seq(out, epochs=1, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [runlog.LOCK, "checkpoints", "config.toml", "metrics.jsonl", "model.pt", "notes.txt",
         "summary.json"])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]
    # A config.toml that is not a run's makes the folder's model.pt foreign too.
    (out / "config.toml").write_text("[train]\nepochs = 1\n")
    message = run_seq_error(out, epochs=1, force=True)
    assert "config.toml, metrics.jsonl, summary.json and 1 more, which" in message, message


def test_extending_a_run_keeps_its_results_until_the_new_ones(tmp_path, monkeypatch):
    """`--resume RUN --epochs N` deleted model.pt and summary.json before training: a crash
    left neither. Now the finished run's stay until the longer run's replace them."""
    from dptrain.worker import run

    out = tmp_path / "run"
    run_seq(out, epochs=1)
    before = {name: (out / name).read_bytes() for name in ("model.pt", "summary.json")}
    real_epoch = runlog.RunLog.epoch

    def crash_at_epoch_2(log, record):
        real_epoch(log, record)
        if record["epoch"] == 2:  # its checkpoint is written
            raise RuntimeError("crash")

    with monkeypatch.context() as patch:
        patch.setattr(runlog.RunLog, "epoch", crash_at_epoch_2)
        config = checkpoint.resume_config("seq", out, {"epochs": 3, "device": "cpu",
                                                       "threads": 1})
        with pytest.raises(RuntimeError, match="crash"):
            run("seq", config, resume=str(out))
    assert {name: (out / name).read_bytes() for name in before} == before
    # The 1-epoch summary does not make the 2-epoch checkpoint a finished run: it is finished.
    config = checkpoint.resume_config("seq", out, {"epochs": 2, "device": "cpu", "threads": 1})
    run("seq", config, resume=str(out))
    finished_as(out, epochs=2)
    with pytest.raises(checkpoint.Finished):
        checkpoint.resume_config("seq", out, {"epochs": 2, "device": "cpu", "threads": 1})


# --- torchrun's scratch, failures and timeouts ------------------------------------------------

def test_the_scratch_of_a_killed_launcher_is_removed(tmp_path, monkeypatch):
    from dptrain.distributed import launch

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads $TMPDIR again
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"dptrain-{gone.pid}-abc"
    alive = tmp_path / f"dptrain-{os.getpid()}-def"
    other = tmp_path / "dptrain-notes"
    for folder in (dead, alive, other):
        (folder / "torchrun").mkdir(parents=True)
    launch.remove_stale_scratch()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


@pytest.mark.slow
def test_a_workers_traceback_leaves_nothing_in_tmpdir(tmp_path):
    """A forked worker that ended in a traceback left $TMPDIR/pytorch-errorfile-*.pickle
    (torch.multiprocessing writes it for the agent and never deletes it)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    crash = ("import sys, dptrain.train\n"
             "def bug(*args, **kwargs): raise RuntimeError('a bug in the loop')\n"
             "dptrain.train.train = bug\n"
             "from dptrain.cli import main\nsys.argv[0] = 'dptrain'\nmain()\n")
    result = subprocess.run([sys.executable, "-c", crash, "ddp", "--nproc", "2", "--device", "cpu",
                             "--out", str(tmp_path / "run"), "--checkpoint-every", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RuntimeError: a bug in the loop" in result.stderr
    assert "failed with exit code 1" in result.stderr and "its traceback is above" in result.stderr
    assert list(scratch.iterdir()) == []


def test_torchruns_grace_applies_on_every_path():
    """Our grace (launch.STOP_GRACE_SECONDS) replaces each of torch's fixed 30 s: if torch
    changes where they are, this fails instead of the jobs waiting 30 s again."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.multiprocessing.spawn import ProcessContext

    from dptrain.distributed import launch

    launch.honour_stop_grace()
    for method in (LocalElasticAgent._stop_workers, PContext.close, ProcessContext.join):
        assert getattr(method, "dptrain", False), method


def failure_of(tmp_path, rank, exitcode, record):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error{rank}.json"
    if record is not None:
        error_file.write_text(json.dumps(record))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                          error_file=str(error_file))


def torchrun_failing_with(monkeypatch, tmp_path, failures):
    import typer
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from dptrain.distributed import launch

    def run(args):
        raise ChildFailedError("dptrain", failures)

    monkeypatch.setattr(torch.distributed.run, "run", run)
    with pytest.raises((typer.Exit, UserError)) as e:
        launch._torchrun(["--nproc-per-node=2", "x"], tmp_path)
    return e.value


def test_a_forked_workers_traceback_is_shown(tmp_path, monkeypatch, capsys):
    """A forked worker's traceback is only in its error file (torchrun's `record`)."""
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom\n'
    record = {"message": {"message": "RuntimeError: boom",
                          "extraInfo": {"py_callstack": trace, "timestamp": "1"}}}
    stopped = torchrun_failing_with(monkeypatch, tmp_path, {0: failure_of(tmp_path, 0, 1, record)})
    assert stopped.exit_code == 1
    errors = capsys.readouterr().err
    assert errors.startswith(trace) and errors.rstrip().endswith("its traceback is above")


def test_the_timed_out_rank_explains_its_peers(tmp_path, monkeypatch, capsys):
    lost = {"message": "rank 0: lost a peer, which probably died (closed)", "timestamp": 5}
    timed = {"message": "rank 1: a collective timed out (--timeout 1 s): ...", "timestamp": 6}
    torchrun_failing_with(monkeypatch, tmp_path, {0: failure_of(tmp_path, 0, 3, lost),
                                                  1: failure_of(tmp_path, 1, 3, timed)})
    assert capsys.readouterr().err == f"dptrain: error: {timed['message']}\n"


def test_a_user_error_without_an_error_file_is_not_repeated(tmp_path, monkeypatch, capsys):
    """The worker could not write its error file (its disk was full): it printed the line."""
    stopped = torchrun_failing_with(monkeypatch, tmp_path, {0: failure_of(tmp_path, 0, 2, None)})
    assert stopped.exit_code == 2 and capsys.readouterr().err == ""


def test_a_failed_process_group_set_up_says_so():
    import torch.distributed as dist

    from dptrain.distributed.strategy import SetupFailed
    from dptrain.worker import _peer_failure

    try:
        raise SetupFailed("could not join the process group within 300 s: a rank did not "
                          "start") from dist.DistStoreError("[socket.cpp:1] wait timeout after 300000ms")
    except SetupFailed as e:
        line = _peer_failure(e, 5.0)
    assert line == ("could not join the process group within 300 s: a rank did not start "
                    "(wait timeout after 300000ms)")


@pytest.mark.slow
def test_a_tiny_timeout_is_one_line_naming_it(tmp_path):
    """--timeout bounds collectives; joining the process group waits longer (ranks start
    seconds apart). Before, the set-up itself timed out after 26 lines of C++ frames."""
    result = run_cli("ddp", "--nproc", "2", "--device", "cpu", "--out", str(tmp_path / "r"),
                     "--epochs", "1", "--timeout", "0.001")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "frame #" not in result.stderr, result.stderr
    assert "a collective timed out (--timeout 0.001 s)" in lines[0]
    assert "the timeout is too short" in lines[0]
