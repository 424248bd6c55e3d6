"""The study: sweeps of real runs, their figures, the reproduction script, and `evaluate`."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

from test_cli import assert_one_line_error

COLUMNS = {"mode", "nproc", "status", "global_batch", "updates_per_epoch", "lr", "val_accuracy",
           "test_accuracy", "test_loss", "train_seconds", "wall_seconds", "speedup", "efficiency"}


def assert_png(path):
    assert path.exists(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_records_a_failed_run_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # A finished run already in ddp-1's folder: that run refuses it (no --force) and fails alone.
    (sweep / "ddp-1").mkdir(parents=True)
    (sweep / "ddp-1" / "summary.json").write_text("{}")
    # --threads 2 reaches the runs (a training flag): 2 ranks x 2 threads oversubscribe 2 cores.
    result = run_cli("sweep", "--mode", "ddp", "--nproc", "1,2", "--epochs", "1", "--threads", "2",
                     "--device", "cpu", "--out", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    if len(os.sched_getaffinity(0)) < 4:  # rank 0 alone warns
        assert (sweep / "ddp-2.log").read_text().count("warning:") == 1
    rows = read_csv(sweep / "sweep.csv")
    assert COLUMNS <= set(rows[0])
    assert [(r["mode"], r["nproc"], r["status"]) for r in rows] == [
        ("seq", "1", "ok"), ("ddp", "1", "failed"), ("ddp", "2", "ok")]
    assert "already holds a finished run" in rows[1]["error"]
    seq, _, ddp2 = rows
    # At the same global batch the ddp run is the sequential computation.
    assert seq["test_accuracy"] == ddp2["test_accuracy"] and float(seq["test_accuracy"]) > 0.8
    assert int(ddp2["global_batch"]) == 1024 and int(ddp2["updates_per_epoch"]) == 41
    assert float(seq["speedup"]) == 1.0
    speedup = float(seq["train_seconds"]) / float(ddp2["train_seconds"])
    assert abs(float(ddp2["speedup"]) - speedup) < 1e-9
    assert abs(float(ddp2["efficiency"]) - speedup / 2) < 1e-9
    for name in ("seq-1", "ddp-2"):
        assert (sweep / name / "summary.json").exists() and (sweep / name / "model.pt").exists()
    assert json.loads((sweep / "sweep.json").read_text())["runs"][1]["status"] == "failed"
    assert "ddp x 1 failed" in result.stdout

    # The sweep's figures, and a plot of two of its runs.
    result = run_cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "val_accuracy.png", "accuracy_vs_nproc.png", "time_vs_nproc.png"):
        assert_png(sweep / name)
    result = run_cli("plot", str(sweep / "seq-1"), str(sweep / "ddp-2"), "--out",
                     str(tmp_path / "two.png"))
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "two.png")

    # A finished sweep is not overwritten by accident.
    assert_one_line_error(run_cli("sweep", "--out", str(sweep)), "already holds a finished sweep")


def test_sweep_and_report_errors(tmp_path):
    assert_one_line_error(run_cli("sweep", "--nproc", "1,x"), "--nproc")
    assert_one_line_error(run_cli("sweep", "--nproc", "0,2"), "--nproc")
    assert_one_line_error(run_cli("sweep", "--mode", "seq"), "--mode")
    assert_one_line_error(run_cli("sweep", "--lr", "-1"), "optim.lr")
    assert_one_line_error(run_cli("report", str(tmp_path)), "no sweep.json")
    assert_one_line_error(run_cli("plot", str(tmp_path)), "not a finished run folder")


@pytest.mark.slow
def test_reproduce_study_quick(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run(["bash", "scripts/reproduce_study.sh", "--quick", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for case in ("c", "d", "e"):
        rows = read_csv(out / case / "sweep.csv")
        assert [(r["mode"], r["nproc"], r["status"]) for r in rows] == [
            ("seq", "1", "ok"), ("ddp", "2", "ok")], case
        for name in ("loss.png", "val_accuracy.png", "accuracy_vs_nproc.png", "time_vs_nproc.png"):
            assert_png(out / case / name)
    for figure in ("a/loss.png", "b/loss.png", "e/seed_vs_linear.png"):
        assert_png(out / figure)
    c = read_csv(out / "c" / "sweep.csv")
    # The seed rule: lr = 0.01 * (42000 / nproc) / 1024; one full-batch update per epoch.
    assert abs(float(c[1]["lr"]) - 0.01 * 21000 / 1024) < 1e-12
    assert c[1]["global_batch"] == "42000" and c[1]["updates_per_epoch"] == "1"


@pytest.mark.slow
def test_evaluate_matches_the_runs_test_accuracy(trained_run, tmp_path):
    summary = json.loads((trained_run / "summary.json").read_text())
    result = run_cli("evaluate", str(trained_run), "--confusion-png", str(tmp_path / "cm.png"))
    assert result.returncode == 0, result.stderr
    correct = round(summary["test_accuracy"] * 14000)
    assert f"test accuracy {summary['test_accuracy']:.4f} ({correct} of 14000" in result.stdout
    assert "precision" in result.stdout and "confusion matrix" in result.stdout
    assert_png(tmp_path / "cm.png")


@pytest.mark.slow
def test_evaluate_needs_a_trained_model(trained_run, tmp_path):
    (tmp_path / "config.toml").write_text((trained_run / "config.toml").read_text())
    assert_one_line_error(run_cli("evaluate", str(tmp_path)), "no model.pt")


def test_the_cli_imports_no_heavy_module():
    code = ("import sys, dptrain.cli; heavy = [m for m in ('torch', 'matplotlib', 'PIL') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr


def test_speedups_and_error_lines():
    from dptrain.sweep import add_speedups, error_line

    rows = [{"mode": "seq", "nproc": 1, "status": "ok", "train_seconds": 10.0, "wall_seconds": 20.0},
            {"mode": "ddp", "nproc": 4, "status": "ok", "train_seconds": 4.0, "wall_seconds": 40.0},
            {"mode": "ddp", "nproc": 8, "status": "failed"}]
    add_speedups(rows)
    assert (rows[1]["speedup"], rows[1]["efficiency"]) == (2.5, 0.625)
    assert (rows[1]["wall_speedup"], rows[1]["wall_efficiency"]) == (0.5, 0.125)
    assert rows[2]["speedup"] is None and rows[2]["efficiency"] is None
    assert error_line("noise\ndptrain: error: bad thing\nmore\n", 2) == "bad thing"
    assert error_line("Traceback\nRuntimeError: boom\n", 1) == "RuntimeError: boom"
    assert error_line("", -9) == "exit status -9"
