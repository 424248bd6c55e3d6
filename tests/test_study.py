"""The study: sweeps of real runs, their figures, the reproduction script, and `evaluate`."""

import csv
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, alive, descendants, run_cli, start_cli, wait_for

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
    # --batch-size reaches the runs (a training flag; test_cli checks the oversubscription
    # warning that --threads 2 would print here).
    result = run_cli("sweep", "--mode", "ddp", "--nproc", "1,2", "--epochs", "1",
                     "--batch-size", "2048", "--device", "cpu", "--out", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_csv(sweep / "sweep.csv")
    assert COLUMNS <= set(rows[0])
    assert [(r["mode"], r["nproc"], r["status"]) for r in rows] == [
        ("seq", "1", "ok"), ("ddp", "1", "failed"), ("ddp", "2", "ok")]
    assert "already holds a finished run" in rows[1]["error"]
    seq, _, ddp2 = rows
    # At the same global batch the ddp run is the sequential computation.
    assert seq["test_accuracy"] == ddp2["test_accuracy"] and float(seq["test_accuracy"]) > 0.8
    assert int(ddp2["global_batch"]) == 2048 and int(ddp2["updates_per_epoch"]) == 20
    assert float(seq["speedup"]) == 1.0
    speedup = float(seq["train_seconds"]) / float(ddp2["train_seconds"])
    assert abs(float(ddp2["speedup"]) - speedup) < 1e-9
    assert abs(float(ddp2["efficiency"]) - speedup / 2) < 1e-9
    for name in ("seq-1", "ddp-2"):
        assert (sweep / name / "summary.json").exists() and (sweep / name / "model.pt").exists()
    assert json.loads((sweep / "sweep.json").read_text())["runs"][1]["status"] == "failed"
    assert "ddp-1 failed" in result.stdout

    # A plot of two of its runs, and where their time goes (test_reproduce_study_quick draws
    # a sweep's figures).
    for extra in ([], ["--breakdown"]):
        result = run_cli("plot", str(sweep / "seq-1"), str(sweep / "ddp-2"), "--out",
                         str(tmp_path / "two.png"), *extra)
        assert result.returncode == 0, result.stderr
        assert_png(tmp_path / "two.png")

    # A finished sweep is not overwritten by accident.
    assert_one_line_error(run_cli("sweep", "--out", str(sweep)), "already holds a finished sweep")


def test_sweep_and_report_errors(tmp_path):
    assert_one_line_error(run_cli("sweep", "--nproc", "1,x"), "--nproc")
    assert_one_line_error(run_cli("sweep", "--nproc", "0,2"), "--nproc")
    assert_one_line_error(run_cli("sweep", "--mode", "seq,ddp"), "--mode")
    assert_one_line_error(run_cli("sweep", "--mode", "seq", "--nproc", "2"), "--mode seq", "--nproc")
    assert_one_line_error(run_cli("sweep", "--lr", "-1"), "optim.lr")
    assert_one_line_error(run_cli("sweep", "--vary", "bach_size=1,2"), "did you mean batch_size?")
    assert_one_line_error(run_cli("sweep", "--vary", "hidden=16,16"), "':'")
    assert_one_line_error(run_cli("sweep", "--vary", "nproc=1,2"), "use --nproc")
    assert_one_line_error(run_cli("sweep", "--vary", "lr=0.1,x"), "--vary lr: expected a number")
    # Every cell's config is checked before any run starts.
    assert_one_line_error(run_cli("sweep", "--vary", "lr_scaling=none,cube", "--out",
                                  str(tmp_path / "s")), "optim.lr_scaling", "cube")
    assert not (tmp_path / "s").exists()
    assert_one_line_error(run_cli("report", str(tmp_path)), "no sweep.json")
    assert_one_line_error(run_cli("report", str(tmp_path / "nope")), "no such folder")
    assert_one_line_error(run_cli("plot", str(tmp_path)), "is not a run folder (no metrics.jsonl)")
    assert_one_line_error(run_cli("sweep", "--resume", str(tmp_path)), "no sweep.json")
    assert_one_line_error(run_cli("sweep", "--resume", "auto"), "folder of the interrupted sweep")


def test_report_on_a_training_run_points_to_plot(tmp_path):
    (tmp_path / "summary.json").write_text('{"mode": "fsdp"}')
    assert_one_line_error(run_cli("report", str(tmp_path)), "a training run, not a sweep",
                          f"dptrain plot {tmp_path}")
    assert_one_line_error(run_cli("sweep", "--resume", str(tmp_path)), "a training run",
                          f"dptrain fsdp --resume {tmp_path}")


def test_vary_parses_like_hydra_multirun():
    from dptrain.config import Config
    from dptrain.study.sweep import Grid, cell_config, cell_name, column_of, parse_vary

    assert parse_vary("batch_size=256,1024").values == (256, 1024)
    assert parse_vary("train.batch_size=256").values == (256,)  # section.key works too
    assert parse_vary("hidden=16,16:256,256").values == ((16, 16), (256, 256))
    assert parse_vary("hidden=[16,16],[8]").values == ((16, 16), (8,))  # Hydra's list syntax
    assert parse_vary("full_batch=true,false").values == (True, False)
    assert parse_vary("lr=0.1,1e-3").values == (0.1, 0.001)
    assert parse_vary("lr_scaling=none:sqrt").texts == ("none", "sqrt")
    grid = Grid(("ddp", "fsdp"), (1, 2), (parse_vary("hidden=16,16:256,256"),
                                          parse_vary("lr=0.1,0.01")))
    cells = grid.cells()
    assert [cell_name(c) for c in cells] == ["hidden=16-16,lr=0.1", "hidden=16-16,lr=0.01",
                                             "hidden=256-256,lr=0.1", "hidden=256-256,lr=0.01"]
    assert grid.runs_per_cell() == [("seq", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert Grid(("seq",), (1, 2)).runs_per_cell() == [("seq", 1)]
    config = cell_config(Config(), cells[2])
    assert config.model.hidden == (256, 256) and config.optim.lr == 0.1
    # Every run of a cell, seq included, gets the same explicit threads per process.
    assert config.system.threads == 1
    threads4 = cell_config(Config(), (( parse_vary("threads=4"), 0),))
    assert threads4.system.threads == 4
    # A varied key that is also a result column gets its section: lr is the scaled lr.
    assert (column_of("lr"), column_of("hidden"), column_of("threads")) == (
        "optim.lr", "hidden", "system.threads")


def test_speedups_compare_each_run_with_the_seq_run_of_its_cell():
    from dptrain.study.sweep import add_speedups

    rows = [{"mode": "seq", "nproc": 1, "cell": "a", "status": "ok", "train_seconds": 10.0,
             "wall_seconds": 12.0},
            {"mode": "ddp", "nproc": 2, "cell": "a", "status": "ok", "train_seconds": 5.0,
             "wall_seconds": 6.0},
            {"mode": "seq", "nproc": 1, "cell": "b", "status": "ok", "train_seconds": 1.0,
             "wall_seconds": 2.0},
            {"mode": "ddp", "nproc": 2, "cell": "b", "status": "ok", "train_seconds": 2.0,
             "wall_seconds": 4.0},
            {"mode": "ddp", "nproc": 2, "cell": "c", "status": "ok", "train_seconds": 2.0,
             "wall_seconds": 4.0}]
    add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 1.0, 0.5, None]  # c has no seq run
    assert [r["wall_efficiency"] for r in rows[:4]] == [1.0, 1.0, 1.0, 0.25]


@pytest.mark.slow
def test_a_vary_grid_runs_each_cell_against_its_own_seq_and_resumes(tmp_path):
    sweep = tmp_path / "grid"
    result = run_cli("sweep", "--mode", "ddp", "--nproc", "2", "--vary",
                     "batch_size=2048,4096", "--epochs", "1", "--device", "cpu",
                     "--out", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_csv(sweep / "sweep.csv")
    assert list(rows[0])[:4] == ["mode", "nproc", "batch_size", "status"]
    assert [(r["batch_size"], r["mode"], r["nproc"], r["status"]) for r in rows] == [
        (b, m, n, "ok") for b in ("2048", "4096") for m, n in (("seq", "1"), ("ddp", "2"))]
    for r in rows:
        assert r["global_batch"] == r["batch_size"]  # the cell's value reached the run
        assert r["run_dir"] == f"batch_size={r['batch_size']}/{r['mode']}-{r['nproc']}"
        assert (sweep / r["run_dir"] / "summary.json").exists()
        assert r["threads"] == "1"  # seq and the parallel runs alike
        assert int(r["peak_rss_bytes"]) > 50e6 and float(r["epoch_seconds"]) > 0
        seq = next(s for s in rows if s["mode"] == "seq" and s["batch_size"] == r["batch_size"])
        speedup = float(seq["train_seconds"]) / float(r["train_seconds"])
        assert abs(float(r["speedup"]) - speedup) < 1e-9
        # At an equal global batch every mode computes the seq run.
        assert r["test_accuracy"][:6] == seq["test_accuracy"][:6]
    assert rows[0]["test_accuracy"] != rows[2]["test_accuracy"]  # the two batches differ

    # (Its figures: test_reproduce_study_quick draws those of the same kind of grid, g-nproc.)

    # An interrupted sweep: the last run lost its summary (its checkpoint is complete).
    meta = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**meta, "complete": False,
                                                  "runs": meta["runs"][:3]}))
    (sweep / "batch_size=4096" / "ddp-2" / "summary.json").unlink()
    kept = (sweep / "batch_size=2048" / "seq-1" / "summary.json").stat().st_mtime_ns
    assert_one_line_error(run_cli("sweep", "--resume", str(sweep), "--epochs", "2"),
                          "as it was planned", "--epochs")
    result = run_cli("sweep", "--resume", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("(finished before; kept)") == 3
    assert (sweep / "batch_size=2048" / "seq-1" / "summary.json").stat().st_mtime_ns == kept
    assert "resuming from" in (sweep / "batch_size=4096" / "ddp-2.log").read_text()
    after = read_csv(sweep / "sweep.csv")
    assert [r["status"] for r in after] == ["ok"] * 4
    assert after[3]["test_accuracy"] == rows[3]["test_accuracy"]
    assert json.loads((sweep / "sweep.json").read_text())["complete"] is True
    assert_one_line_error(run_cli("sweep", "--resume", str(sweep)), "complete")


# Stands in for `dptrain` (the script's $DPTRAIN): records each command and the config files
# it names, and runs nothing.
RECORDER = """import json, os, sys
with open(os.environ["RECORDED"], "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
"""


def reproduce(out, only, env=None):
    result = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_study.sh"), "--quick",
                             "--only", only, "--out", out.name], capture_output=True, text=True,
                            cwd=out.parent, timeout=600, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_reproduce_study_quick(tmp_path):
    """Cases c, f and g run for real: a nproc sweep with the seed rule, the width grid with
    fsdp, the cost model and the gradient sums, the lr rules and the nproc check. Cases a, b,
    d and e are the same commands on other configs, and h's (the knobs' matrix and the cost
    model extended: tests/test_matrix.py and test_cost_model.py run them) too: the script runs
    them with a recorder as `dptrain` and as `python`, and the test checks what each would run
    and read."""
    out = tmp_path / "study"
    # A relative --out is the caller's folder (here tmp_path), not the repository's.
    result = reproduce(out, "c,f,g")
    rows = read_csv(out / "c" / "sweep.csv")
    assert [(r["mode"], r["nproc"], r["status"]) for r in rows] == [
        ("seq", "1", "ok"), ("ddp", "2", "ok")]
    for name in ("loss.png", "val_accuracy.png", "accuracy_vs_nproc.png", "time_vs_nproc.png",
                 "time_breakdown.png"):
        assert_png(out / "c" / name)
    assert (out / "c" / "time_breakdown.csv").read_text().count("\n") == 3  # a line per run
    # The seed rule: lr = 0.01 * (42000 / nproc) / 1024; one full-batch update per epoch.
    assert abs(float(rows[1]["lr"]) - 0.01 * 21000 / 1024) < 1e-12
    assert rows[1]["global_batch"] == "42000" and rows[1]["updates_per_epoch"] == "1"
    # The headers follow --quick.
    assert "nproc 2, 1 epoch (" in result.stdout and "100 epochs" not in result.stdout

    # Sections 2-3: the width grid, its figures, the cost model and the gradient sums.
    f = read_csv(out / "f" / "sweep.csv")
    assert [(r["mode"], r["nproc"], r["hidden"]) for r in f] == [
        ("seq", "1", "16,16"), ("ddp", "2", "16,16"), ("fsdp", "2", "16,16")]
    for name in ("speedup_vs_nproc.png", "speedup_heatmap.png", "memory_vs_nproc.png",
                 "cost_model.png", "time_breakdown.png"):
        assert_png(out / "f" / name)
    # FSDP holds half of the parameters, gradients and Adam state on each of its 2 ranks.
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert int(f[2][key]) < 0.6 * int(f[1][key]), key
    model = json.loads((out / "f" / "cost_model.json").read_text())
    assert len(model["points"]) == 2 and all(v >= 0 for v in model["coefficients"].values())
    sums = json.loads((out / "f" / "grad_sync.json").read_text())["rows"]
    assert {"collective", "shm", "shm all-read", "shm rs+ag"} == set(sums[0]["seconds"])
    # Section 4: accuracy against the global batch; the nproc check with the seed rule.
    g = read_csv(out / "g-adam" / "sweep.csv")
    assert [(r["lr_scaling"], r["batch_size"], r["lr"]) for r in g] == [
        ("sqrt", "1024", "0.01"), ("sqrt", "4096", "0.02")]
    assert_png(out / "g-adam" / "accuracy_vs_batch.png")
    demo = read_csv(out / "g-nproc" / "sweep.csv")
    # seed: lr = 0.01 * (4096 / nproc) / 1024, so seq and ddp x2 train differently.
    assert [(r["mode"], float(r["lr"])) for r in demo] == [("seq", pytest.approx(0.04)),
                                                           ("ddp", pytest.approx(0.02))]
    for name in ("accuracy_vs_batch.png", "speedup_vs_nproc.png", "speedup_heatmap.png",
                 "memory_vs_nproc.png"):
        assert_png(out / "g-nproc" / name)

    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    recorded = tmp_path / "recorded.jsonl"
    result = reproduce(out, "a,b,d,e,h", {"DPTRAIN": f"{sys.executable} {recorder}",
                                          "PYTHON": f"{sys.executable} {recorder}",
                                          "RECORDED": str(recorded)})
    assert "lr 0.01, 1 epoch (" in result.stdout and "25 epochs" not in result.stdout
    commands = [json.loads(line) for line in recorded.read_text().splitlines()]
    written = {out / "c" / "ddp-2"}  # the real sweep's run that case e draws
    for command in commands:
        argv = command["argv"]
        flags = {a: b for a, b in zip(argv, argv[1:] + [""]) if a.startswith("--")
                 and not b.startswith("--")}
        if "--config" in argv:  # a config the real commands would load
            path = Path(command["cwd"]) / flags["--config"]
            assert path.is_file() and tomllib.loads(path.read_text()), path
        if argv[0] in ("seq", "ddp"):
            assert flags["--epochs"] == "1" and flags.get("--nproc", "2") == "2", argv
            written.add(Path(flags["--out"]))
        elif argv[0] == "sweep":
            assert flags["--epochs"] == "1" and flags.get("--nproc", "2") == "2", argv
            written.update(Path(flags["--out"]) / name for name in ("seq-1", "ddp-2"))
            written.add(Path(flags["--out"]))
        elif argv[0].endswith("compress_cost.py"):
            written.add(Path(command["cwd"]) / flags["--json"])
        elif argv[0].endswith("cost_model.py"):  # section 2's fit (run for real above), case h's
            assert Path(argv[1]) == out / "f" and (out / "f" / "sweep.json").is_file(), argv
            knobs = argv[argv.index("--knobs") + 1:argv.index("--grad-sync")]
            assert knobs and set(map(Path, knobs)) <= written, argv
            assert Path(command["cwd"]) / flags["--compress-cost"] in written, argv
        else:  # plot, report and matrix read only what an earlier command wrote
            reads = [Path(a) for a in argv[1:]
                     if not a.startswith("--") and a not in flags.values()]
            assert reads and set(reads) <= written, argv
    assert [Path(c["argv"][0]).name for c in commands] == [
        "seq", "ddp", "plot", "ddp", "plot", "sweep", "report", "sweep", "plot", "report",
        "sweep", "sweep", "matrix", "compress_cost.py", "cost_model.py"]  # case h


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
    from dptrain.study.sweep import add_speedups, error_line

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


# --- a sweep owns its folder, writes only its own files there, and takes its runs with it -----

SEQ_SWEEP = ["sweep", "--mode", "seq", "--epochs", "1", "--batch-size", "4096", "--device", "cpu",
             "--checkpoint-every", "0"]


@pytest.mark.slow
def test_a_sweep_writes_only_its_own_files_and_reruns_transient_failures(tmp_path):
    """Through a link, `sweep --resume` overwrote a log and sweep-config.toml elsewhere, and
    `report` a figure; a run whose folder was in use was recorded as failed in a sweep marked
    complete, so it could never be resumed; a second sweep into the folder ran beside the first."""
    from dptrain.errors import UserError
    from dptrain.storage.runlog import RunLock
    from dptrain.study.plots import report
    from dptrain.study.sweep import grid_to_resume, run_sweep

    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    elsewhere.mkdir()
    held = RunLock(sweep / "seq-1")  # another run holds the one run's folder
    held.acquire()
    try:
        result = run_cli(*SEQ_SWEEP, "--out", str(sweep))
    finally:
        held.release()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(--resume runs it again)" in result.stdout and "sweep --resume" in result.stdout
    meta = json.loads((sweep / "sweep.json").read_text())
    assert meta["complete"] is False and meta["runs"][0]["transient"] is True
    assert "is in use by another run" in meta["runs"][0]["error"]

    def resume_here():  # what `sweep --resume` does, in this process
        run_sweep(*grid_to_resume(sweep), sweep, resume=True, echo=lambda line: None)

    held = RunLock(sweep, kind="sweep")  # a second sweep, while this one runs, is refused
    held.acquire()
    try:
        with pytest.raises(UserError, match=rf"is in use by another sweep \(pid {os.getpid()} "):
            resume_here()
    finally:
        held.release()
    config = (sweep / "sweep-config.toml").read_text()
    for name in ("seq-1.log", "sweep-config.toml", "loss.png"):
        (elsewhere / name).write_text("not the sweep's")
        (sweep / name).unlink(missing_ok=True)
        (sweep / name).symlink_to(elsewhere / name)
    with pytest.raises(UserError, match="sweep-config.toml is a symbolic link"):
        resume_here()
    (sweep / "sweep-config.toml").unlink()
    (sweep / "sweep-config.toml").write_text(config)
    result = run_cli("sweep", "--resume", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_csv(sweep / "sweep.csv")[0]["status"] == "ok"
    assert json.loads((sweep / "sweep.json").read_text())["complete"] is True
    report(sweep)
    for name in ("seq-1.log", "loss.png"):
        assert (elsewhere / name).read_text() == "not the sweep's", name
        assert not (sweep / name).is_symlink(), name
    assert "test accuracy" in (sweep / "seq-1.log").read_text()
    assert_png(sweep / "loss.png")

    # Values from sweep.json name files: each is checked as the flags are.
    meta = json.loads((sweep / "sweep.json").read_text())
    for forged, where in ((dict(runs=[{**meta["runs"][0], "run_dir": "../elsewhere"}]), report),
                          (dict(modes=["../../x"], complete=False), grid_to_resume),
                          (dict(nprocs=["1/../.."], complete=False), grid_to_resume)):
        (sweep / "sweep.json").write_text(json.dumps({**meta, **forged}))
        with pytest.raises(UserError, match="sweep|run_dir|--mode|--nproc"):
            where(sweep)
    (sweep / "seq-1").rename(tmp_path / "moved")
    (sweep / "seq-1").symlink_to(tmp_path / "moved")
    (sweep / "sweep.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(UserError, match=f"{sweep}/seq-1 is a symbolic link"):
        resume_here()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_sweep_takes_its_run_with_it(tmp_path, sig):
    """Killed, a sweep left its run training as an orphan; now the run gets SIGTERM with it.
    SIGTERM stops the sweep as Ctrl-C does: one line, and sweep.json says it is not complete."""
    sweep = tmp_path / "sweep"
    process = start_cli(*SEQ_SWEEP, "--epochs", "200", "--out", str(sweep), log=tmp_path / "log")
    runs = set()
    wait_for(lambda: runs.update(descendants(process.pid)) or runs, what="the sweep's run")
    process.send_signal(sig)
    wait_for(lambda: not alive(runs), timeout=60, what="the run to end with the sweep")
    assert process.wait(timeout=60) == (143 if sig == signal.SIGTERM else -9), \
        (tmp_path / "log").read_text()
    assert not (sweep / "seq-1" / "summary.json").exists()
    if sig == signal.SIGTERM:
        lines = (tmp_path / "log").read_text().splitlines()
        assert [line for line in lines if "error" in line] == [
            f"dptrain: error: stopped by signal SIGTERM; the runs that finished are in "
            f"{sweep}/sweep.csv; continue with `dptrain sweep --resume {sweep}`"]
        assert json.loads((sweep / "sweep.json").read_text())["complete"] is False
