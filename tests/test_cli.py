"""The CLI as a user meets it: help, one-line errors with exit status 2, run folders."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import run_cli, train
from test_data import fake_mnist


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_three_modes():
    result = run_cli("--help")
    assert result.returncode == 0
    for mode in ("seq", "ddp", "fsdp"):
        assert mode in result.stdout
    result = run_cli("ddp", "--help")
    for flag in ("--nproc", "--rdzv-endpoint", "--backend", "--full-batch", "--lr-scaling"):
        assert flag in result.stdout


WIDE = {"COLUMNS": "200"}  # one row per option, so that a row can be read whole


def help_rows(*command: str) -> dict[str, str]:
    """--help of a command: {'--epochs': its row, ...}."""
    result = run_cli(*command, "--help", env=WIDE)
    assert result.returncode == 0, result.stderr
    rows, name = {}, None
    for line in result.stdout.splitlines():
        words = line.strip("│ ").split()
        if words and words[0].startswith("--"):
            name = words[0]
            rows[name] = ""
        elif not line.startswith("│"):
            name = None  # a panel's border, or text outside the panels
        if name:
            rows[name] += " " + " ".join(words)  # a long help text goes on over several lines
    return rows


def test_help_shows_each_flags_built_in_default_and_no_flag_type_tag():
    from dptrain.config import Config

    seq, ddp = help_rows("seq"), help_rows("ddp")
    assert not {"--backend", "--timeout", "--grad-sync", "--nproc"} & set(seq)  # not seq's
    assert {"--backend", "--timeout", "--grad-sync", "--nproc", "--rdzv-id"} <= set(ddp)
    defaults = Config()
    assert f"[default: {defaults.train.epochs}]" in ddp["--epochs"]
    assert f"[default: {defaults.launch.nproc}]" in ddp["--nproc"]
    assert f"[default: {defaults.optim.lr}]" in seq["--lr"]
    assert "[default: runs/<mode>-<timestamp>]" in seq["--out"]
    for name, row in ddp.items():  # every training and launch flag; on/off switches excepted
        assert "[default: " in row or name in ("--help", "--force"), row
    for command in (("seq",), ("export",), ()):
        for row in help_rows(*command).values():
            assert "<bool>" not in row, row
    assert "a --config file may change them" in run_cli("seq", "--help", env=WIDE).stdout
    # A sweep reads some training flags otherwise: its own folder, resume and threads.
    sweep = help_rows("sweep")
    assert "[default: runs/sweep-<modes>-<timestamp>]" in sweep["--out"]
    assert "'auto'" not in sweep["--resume"] and "SWEEP_DIR" in sweep["--resume"]
    assert "0 = auto" not in sweep["--threads"] and "[default: 1]" in sweep["--threads"]


@pytest.mark.parametrize("args, fragments", [
    (["seq", "--nproc", "2"], ["seq trains in one process", "belongs to ddp and fsdp",
                               "dptrain ddp --nproc"]),
    (["seq", "--grad-sync", "shm"], ["--grad-sync belongs to ddp and fsdp"]),
    (["fsdp", "--grad-sync", "shm"], ["fsdp always sums gradients through the process group"]),
    (["ddp", "--rdzv-id", "job1"], ["launch.rdzv_id", "--rdzv-endpoint"]),
    (["seq", "--full-batch", "--batch-size", "512"], ["--batch-size is not used with --full-batch"]),
    (["seq", "--checkpoint-every", "0", "--keep", "3"], ["--keep is not used"]),
    (["seq", "--warmup-epochs", "2"], ["--warmup-epochs is not used with lr_scaling none"]),
    (["seq", "--force", "--resume", "runs/a"], ["--force starts --out over", "pass one of them"]),
])
def test_flags_a_run_would_ignore_are_refused(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["seq", "--epochs", "abc"], ["--epochs"]),
    (["seq", "--bogus"], ["--bogus"]),
    (["seq", "--epochs", "0", "--lr", "-1"], ["train.epochs: must be >= 1", "optim.lr: must be > 0"]),
    (["seq", "--activation", "gelu"], ["model.activation"]),
    (["seq", "--data-dir", "/no/such/dir"], ["/no/such/dir", "does not exist"]),
    (["seq", "--config", "/no/such.toml"], ["does not exist"]),
    (["ddp", "--batch-size", "1", "--device", "cpu"], ["smaller than the world size 2"]),
    (["seq", "--batch-size", "50000"], ["--full-batch"]),
])
def test_user_errors_are_one_line(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_rendezvous_port_in_use_is_refused_at_once():
    import socket

    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        result = run_cli("ddp", "--device", "cpu", "--rdzv-endpoint", f"127.0.0.1:{port}",
                         timeout=60)
    assert_one_line_error(result, f"port {port} is already in use")


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 3\n")
    assert_one_line_error(run_cli("seq", "--config", str(bad)), "unknown key 'train.epochz'")
    bad.write_text("[train\n")
    assert_one_line_error(run_cli("seq", "--config", str(bad)), "not valid TOML")


def test_corrupt_data_is_named(tmp_path):
    directory = fake_mnist(tmp_path / "fake")
    assert_one_line_error(run_cli("ddp", "--device", "cpu", "--data-dir", str(directory)),
                          "train-images-idx3-ubyte.gz: checksum mismatch")


@pytest.mark.slow
def test_worker_side_error_reaches_the_user_as_one_line(tmp_path):
    # Only a worker can tell (it imports torch); the message comes back through torchrun.
    result = run_cli("ddp", "--backend", "nccl", "--device", "cpu", "--out", str(tmp_path / "r"))
    assert_one_line_error(result, "--backend nccl needs CUDA devices")


@pytest.fixture(scope="module")
def finished_seq(tmp_path_factory):
    """(folder, summary) of a finished 1-epoch seq run at batch 4096; tests change copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, train("seq", out, "--epochs", "1", "--batch-size", "4096")


def copy_of(finished_seq, tmp_path):
    import shutil

    return shutil.copytree(finished_seq[0], tmp_path / "run"), finished_seq[1]


@pytest.mark.slow
def test_finished_run_is_never_overwritten_silently(tmp_path, finished_seq):
    out, first = copy_of(finished_seq, tmp_path)
    assert_one_line_error(run_cli("seq", "--epochs", "1", "--out", str(out)), "--force")
    assert json.loads((out / "summary.json").read_text()) == first
    second = train("seq", out, "--epochs", "2", "--batch-size", "4096", "--force")
    assert second["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_direct_worker_with_a_finished_run_fails_cleanly(tmp_path, free_port):
    """torchrun -m dptrain.worker: rank 0 refuses the folder and the other rank is told."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         "-m", "dptrain.worker", "--mode", "ddp", "--device", "cpu", "--epochs", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "dptrain: error: --out" in result.stderr and "--force" in result.stderr


def test_torchrun_args_single_and_multi_node():
    from dptrain.distributed.launch import torchrun_args
    from dptrain.config import build_config

    single = torchrun_args(build_config({}, {"nproc": 3}))
    assert "--standalone" in single and "--nproc-per-node=3" in single
    multi = torchrun_args(build_config({}, {"nproc": 4, "nnodes": 2, "node_rank": 1,
                                            "rdzv_endpoint": "head:29400", "rdzv_id": "job7"}))
    assert "--standalone" not in multi
    for arg in ("--nnodes=2", "--rdzv-endpoint=head:29400", "--rdzv-id=job7", "--node-rank=1",
                "--rdzv-backend=c10d"):
        assert arg in multi


@pytest.mark.slow
def test_full_batch_linear_lr_and_the_oversubscription_warning(tmp_path):
    import os

    out, threads = tmp_path / "run", len(os.sched_getaffinity(0)) + 1
    result = run_cli("seq", "--full-batch", "--lr-scaling", "linear", "--epochs", "2",
                     "--threads", str(threads), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stdout and f"{threads} thread(s)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["global_batch"], summary["updates_per_epoch"]) == (42000, 1)
    assert summary["lr"] == pytest.approx(0.01 * 42000 / 1024)
    assert "lr=0.410156" in result.stdout  # the resolved lr is printed at the start
    assert "lr = 0.41015625" in (out / "config.toml").read_text()
    assert summary["threads"] == threads  # an explicit --threads is obeyed, even past the cores


@pytest.mark.parametrize("text, fragment", [
    ('[train]\nepochs = "ten"\n', "train.epochs: expected an integer"),
    ("[launch]\nnproc = 0\n", "launch.nproc: must be >= 1"),
    ("[run]\nkeep = 0\n", "run.keep: must be >= 1"),
])
def test_config_file_type_and_range_errors(tmp_path, text, fragment):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    assert_one_line_error(run_cli("ddp", "--device", "cpu", "--config", str(bad)), fragment)


def test_flag_range_errors():
    assert_one_line_error(run_cli("ddp", "--nproc", "0"), "launch.nproc: must be >= 1")
    assert_one_line_error(run_cli("ddp", "--checkpoint-every", "-1", "--max-restarts", "-1"),
                          "run.checkpoint_every: must be >= 0", "launch.max_restarts: must be >= 0")


@pytest.mark.parametrize("damage, fragment", [
    (lambda raw: raw[:-100], "needs 10008 (truncated or corrupt file)"),
    (lambda raw: b"\x00\x00\x08\x07" + raw[4:], "wrong magic number 0x00000807"),
])
def test_truncated_or_corrupt_idx_is_named(tmp_path, damage, fragment):
    import gzip

    from conftest import MNIST_DIR

    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz"):
        (data / name).symlink_to(MNIST_DIR / name)
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(damage(raw)))
    assert_one_line_error(run_cli("seq", "--data-dir", str(data)),
                          "t10k-labels-idx1-ubyte.gz", fragment)


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(run_cli("seq", "--resume", str(tmp_path / "run")),
                          "holds no complete checkpoint")
    assert_one_line_error(run_cli("ddp", "--resume", "auto"), "--resume auto", "--out")
    assert_one_line_error(run_cli("export", str(tmp_path / "run")), "holds no complete checkpoint")


@pytest.mark.slow
def test_resume_refuses_a_changed_run_and_an_unfinished_run_is_not_restarted(tmp_path,
                                                                             finished_seq):
    out, _ = copy_of(finished_seq, tmp_path)
    assert_one_line_error(run_cli("seq", "--resume", str(out), "--batch-size", "2048"),
                          "batch_size 4096 -> 2048 would change the run")
    assert_one_line_error(run_cli("ddp", "--resume", str(out)), "resume it with that command")
    finished = run_cli("seq", "--resume", str(out))  # nothing to do is success (test_trust.py)
    assert finished.returncode == 0 and "has already finished all 1 epochs" in finished.stdout
    (out / "summary.json").unlink()  # as if it had stopped after its checkpoint
    assert_one_line_error(run_cli("seq", "--epochs", "1", "--out", str(out)),
                          "holds the checkpoints of an unfinished run", "--resume")


def test_a_default_run_uses_one_thread(trained_run):
    from dptrain.config import read_toml

    assert json.loads((trained_run / "summary.json").read_text())["threads"] == 1
    assert read_toml(trained_run / "config.toml")["resolved"]["threads"] == 1


def timed_cli(*args: str, cwd) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m dptrain ARGS` in `cwd`, and the seconds it took, measured around it."""
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "dptrain", *args], capture_output=True,
                            text=True, timeout=300, cwd=cwd)
    return result, time.time() - started


def assert_wall_seconds_is_one_number(stdout: str, summary: dict, elapsed: float) -> None:
    """The printed wall seconds are summary.json's, and no longer than the command took."""
    row = next(line for line in stdout.splitlines() if "wall seconds" in line)
    assert f"{summary['wall_seconds']:.2f}" in row, row
    assert 0 < summary["wall_seconds"] <= elapsed


@pytest.mark.slow
def test_a_runs_config_toml_reused_starts_a_new_run(trained_run, tmp_path):
    from conftest import REPO

    before = (trained_run / "summary.json").read_text()
    env_path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"] = env_path  # dptrain from this checkout, run from tmp_path
    result, elapsed = timed_cli("seq", "--config", str(trained_run / "config.toml"),
                                "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (new,) = (tmp_path / "runs").iterdir()  # runs/seq-<timestamp>, beside the user
    summary = json.loads((new / "summary.json").read_text())
    assert summary["epochs"] == 1 and (trained_run / "summary.json").read_text() == before
    assert_wall_seconds_is_one_number(result.stdout, summary, elapsed)


@pytest.mark.slow
def test_log_lines_never_wrap_and_wall_seconds_is_one_number(tmp_path):
    # Output to a pipe, as in a log. A long --out and a 4-digit lr make every line exceed 80.
    out = tmp_path / ("a-run-folder-with-a-long-name-" * 3) / "ddp"
    result, elapsed = timed_cli("ddp", "--device", "cpu", "--epochs", "1", "--lr", "0.012345",
                                "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dptrain mode=ddp") and lines[0].endswith(f"out={out}")
    epoch = re.compile(r"^epoch +1  train_loss \S+  val_loss \S+  val_acc \S+  lr 0\.0123\d  "
                       r"\S+s  \S+ samples/s$")
    assert [line for line in lines if line.startswith("epoch")] == \
        [line for line in lines if epoch.match(line)] != []
    assert len(max(lines, key=len)) > 80 and lines[-1] == f"results in {out}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threads"] == 1
    assert_wall_seconds_is_one_number(result.stdout, summary, elapsed)
