"""`dptrain plan` (study/plan.py, study/measure.py) and the cost model it fits (costmodel.py)."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import run_cli
from dptrain.config import Config, resolve
from dptrain.errors import UserError
from dptrain.study import plan as planner
from dptrain.study.costmodel import VM_2CORE, CostModel, fit


def invoke(*args: str):
    from dptrain.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args, words", [
    (["--max-nproc", "0"], "--max-nproc 0: expected at least 1 process"),
    (["--target-accuracy", "0.9", "--epochs", "3"], "pass one of them"),
    (["--target-accuracy", "1.5"], "expected a fraction between 0 and 1"),
    (["--hidden", "100000,100000"], "plan: the model of hidden [100000, 100000] (10,079,"),
    (["--lr-schedule", "cosine"], "plan predicts a constant lr after the warmup"),
    (["--keep-best", "--resume", "auto"], "plan starts none to continue; --keep-best: plan's"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    """Refused before anything is measured or allocated, and nothing is written."""
    result = invoke("plan", *args, "--out", str(tmp_path / "plan"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dptrain: error: ") and words in lines[0]
    assert not (tmp_path / "plan").exists()


def test_an_unreachable_target_says_what_the_calibration_reached(tmp_path, monkeypatch):
    from dptrain.study import measure

    records = [{"epoch": 1, "val_accuracy": 0.8811, "noise_scale": 250.0},
               {"epoch": 2, "val_accuracy": 0.9106, "noise_scale": 330.0}]
    monkeypatch.setattr(measure, "train_until", lambda *a, **k: {
        "records": records, "ended": "budget", "seconds": 5.0, "command": []})
    with pytest.raises(UserError) as refused:
        planner.calibrate(Config(), tmp_path, 0.99, 5.0, 42000, echo=lambda _: None)
    assert ("reached val accuracy 0.9106 in 2 epoch(s) (82 updates) within --budget 5 s, short "
            "of --target-accuracy 0.99") in str(refused.value)
    # Reached: S0 interpolated inside epoch 2, B_noise of epoch 2, S_min from both.
    found = planner.calibrate(Config(), tmp_path, 0.9, 5.0, 42000, echo=lambda _: None)
    s0 = (1 + (0.9 - 0.8811) / (0.9106 - 0.8811)) * 41
    assert found["updates_to_target"] == pytest.approx(s0)
    assert found["noise_scale"] == 330.0
    assert found["s_min"] == pytest.approx(s0 / (1 + 330 / 1024))


def test_updates_follow_the_noise_scale():
    records = [{"val_accuracy": 0.5}, {"val_accuracy": 0.9}]
    assert planner.updates_to_reach(records, 0.3, 10) == pytest.approx(5)  # from chance
    assert planner.updates_to_reach(records, 0.7, 10) == pytest.approx(15)
    assert planner.updates_to_reach(records, 0.95, 10) is None
    # S(B) = S_min (1 + B_noise / B): a batch far below B_noise needs B_noise / B times S_min.
    assert planner.predicted_updates(100, 400, 100) == 500
    assert planner.predicted_updates(100, 400, 1e9) == pytest.approx(100)


def test_constants_are_reused_only_on_the_same_machine(tmp_path):
    machine = {"host": "here", "cores": 2, "torch": "2.14.1", "device": "auto", "threads": 1}
    (tmp_path / "plan.json").write_text(json.dumps({
        "machine": machine, "constants": {"cost_model": VM_2CORE.as_dict(), "points": []}}))
    reused = planner.load_constants(tmp_path, machine)
    assert CostModel.from_dict(reused["cost_model"]) == VM_2CORE
    with pytest.raises(UserError, match="measured elsewhere \\(cores 2 here 16\\)"):
        planner.load_constants(tmp_path / "plan.json", {**machine, "cores": 16})


def test_the_cost_model_fit_recovers_its_constants():
    """Points made by a known model (4 widths, seq and ddp x2) give its constants back."""
    points = [{"mode": mode, "nproc": n, "params": p, "batch": 1024,
               "step_seconds": VM_2CORE.seconds_per_update(p, 1024, n)}
              for p in (13002, 55050, 269322, 1863690) for mode, n in (("seq", 1), ("ddp", 2))]
    np.testing.assert_allclose(fit(points, 2).coefficients, VM_2CORE.coefficients, rtol=1e-6)
    assert VM_2CORE.crossover(1024) == pytest.approx(15260, rel=1e-3)


def test_memory_per_rank_is_the_baseline_and_the_models_estimate():
    from dptrain.components.memory import parameter_count, training_memory

    config = Config()
    from dptrain.study.measure import with_width

    wide = with_width(config, (4096, 4096))
    assert planner.memory_per_rank(config, (4096, 4096), 1024, 4, "fsdp", 500) == 500 + \
        training_memory(wide, mode="fsdp", world_size=4, global_batch=1024).total
    # One process is seq, whatever the mode; Adam keeps 16 bytes per parameter.
    seq = planner.memory_per_rank(config, (16, 16), 1024, 1, "fsdp", 0)
    assert seq == training_memory(config, mode="seq", world_size=1, global_batch=1024).total
    assert seq > 16 * parameter_count((16, 16))


def runnable(command: str, n_train: int = 42000):
    """The command's flags parsed by the dptrain CLI and resolved into a plan (not run)."""
    from dptrain.cli import app
    from dptrain.flags import config_from_flags

    words = shlex.split(command)
    assert words[0] == "dptrain"
    group = typer_command(app)
    command_obj = group.get_command(group.make_context("dptrain", [words[1]]), words[1])
    context = command_obj.make_context(words[1], words[2:])
    config = config_from_flags(context.params)
    return resolve(config, mode=words[1], world_size=context.params.get("nproc") or 1,
                   n_train=n_train)


def typer_command(app):
    import typer

    return typer.main.get_command(app)


def test_a_recommendation_is_a_runnable_command():
    config = Config()
    config = planner._with_batch(config, 1024)
    from dataclasses import replace

    config = replace(config, optim=replace(config.optim, optimizer="sgd", momentum=0.9, lr=0.1,
                                           lr_scaling="sqrt"),
                     model=replace(config.model, hidden=(1024, 1024)),
                     train=replace(config.train, drop_last=False))
    command = planner.command_line(config, 2, 4096, 7)
    assert command == ("dptrain ddp --nproc 2 --hidden 1024,1024 --optimizer sgd --lr 0.1 "
                       "--momentum 0.9 --lr-scaling sqrt --keep-last --batch-size 4096 "
                       "--epochs 7")
    plan = runnable(command)
    assert (plan.global_batch, plan.lr, plan.world_size) == (4096, pytest.approx(0.2), 2)


def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_plan_end_to_end(tmp_path):
    """Times updates, calibrates on one epoch, prints the table and a command that runs; leaves
    nothing behind outside its folder."""
    out, scratch = tmp_path / "plan", tmp_path / "tmp"
    scratch.mkdir()  # the launcher's scratch folders go here, and must go away
    result = run_cli("plan", "--epochs", "1", "--budget", "120", "--max-nproc", "2",
                     "--out", str(out), env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert {"machine", "config", "constants", "calibration", "rows", "recommendation",
            "seconds"} <= set(plan)
    assert [(p["mode"], p["hidden"]) for p in plan["constants"]["points"]] == [
        ("seq", [16, 16]), ("seq", [64, 64]), ("ddp", [16, 16]), ("ddp", [64, 64])]
    assert all(p["step_seconds"] > 0 for p in plan["constants"]["points"])
    calibration = plan["calibration"]
    assert calibration["ended"] == "epochs" and len(calibration["records"]) == 1
    assert calibration["target"] == calibration["records"][0]["val_accuracy"]
    assert calibration["updates_to_target"] == 41 and calibration["noise_scale"] > 0
    # A row per process count and batch (1/4x to 16x of 1024), each with its predictions.
    rows = plan["rows"]
    assert [(r["nproc"], r["batch"]) for r in rows] == [
        (n, b) for n in (1, 2) for b in (256, 512, 1024, 2048, 4096, 8192, 16384)]
    at_1024 = next(r for r in rows if (r["nproc"], r["batch"]) == (1, 1024))
    assert at_1024["updates"] == pytest.approx(41) and at_1024["epochs"] == 1
    for r in rows:
        assert r["seconds_to_target"] == pytest.approx(r["updates"] * r["seconds_per_update"])
        assert r["ddp_bytes_per_rank"] > 0 and r["fsdp_bytes_per_rank"] > 0
    # Bigger batches never need more updates; the table and the command are printed.
    updates = [r["updates"] for r in rows if r["nproc"] == 1]
    assert updates == sorted(updates, reverse=True)
    best = plan["recommendation"]
    assert best["seconds_to_target"] == min(r["seconds_to_target"] for r in rows)
    assert f"run: {best['command']}" in result.stdout.replace("\n", " ")
    assert "s to target" in result.stdout and "noise scale" in result.stdout
    runnable(best["command"])
    # Nothing left behind: no process of the calibration run, no scratch folder outside.
    assert _processes_naming(str(out)) == []
    # (torch's own compile cache, torchinductor_<user>, which any `dptrain ddp` creates there
    # on import, is torch's to keep.)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert {p.name for p in out.iterdir()} == {"plan.json", "config.toml", "calibration",
                                               "calibration.log"}
