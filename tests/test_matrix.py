"""`dptrain matrix` (study/matrix.py) on sweep folders written here: references, verdicts, the
seed band, the cost columns and the outputs. No training: the runs' files are made up."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import run_cli

from dptrain.config import Config, DDPConfig, TrainConfig, to_toml


def write_run(sweep, name, mode, nproc, config, model, accuracy, seconds, optimizer_bytes):
    folder = sweep / name
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(config, {"mode": mode}, reusable=True))
    torch.save(model, folder / "model.pt")
    (folder / "summary.json").write_text(json.dumps({
        "test_accuracy": accuracy, "memory": {
            "peak_rss_bytes": [300 << 20] * nproc, "param_bytes": [100] * nproc,
            "grad_bytes": [100] * nproc, "optimizer_bytes": optimizer_bytes}}))
    return {"mode": mode, "nproc": nproc, "status": "ok", "run_dir": name,
            "epoch_seconds": seconds, "updates_per_epoch": 10}


def write_sweep(sweep, rows):
    (sweep / "sweep.json").write_text(json.dumps({"runs": rows, "complete": True}))


@pytest.fixture
def sweeps(tmp_path):
    from dptrain.components.model import MLP

    base = Config()
    torch.manual_seed(0)
    weights = MLP(base.model.hidden).state_dict()  # model.pt is checked against the config's

    def shifted(by):
        return {k: v + by for k, v in weights.items()}

    band = tmp_path / "band"
    write_sweep(band, [
        write_run(band, f"seed={seed}/seq-1", "seq", 1,
                  replace(base, train=replace(base.train, seed=seed)),
                  weights if seed == 0 else shifted(1.0), accuracy, 1.0, [48])
        for seed, accuracy in ((0, 0.900), (1, 0.910), (2, 0.905))])
    knobs = tmp_path / "knobs"
    write_sweep(knobs, [
        write_run(knobs, "none/ddp-2", "ddp", 2, base, shifted(1e-6), 0.900, 0.5, [48, 48]),
        write_run(knobs, "zero/ddp-2", "ddp", 2, replace(base, ddp=DDPConfig(zero=True)),
                  weights, 0.900, 0.6, [40, 8]),
        write_run(knobs, "fp16/ddp-2", "ddp", 2,
                  replace(base, ddp=DDPConfig(grad_compress="fp16")), shifted(0.1), 0.930, 2.0,
                  [48, 48]),
        # a seed without a seq run: no reference, not a row
        write_run(knobs, "seed7/ddp-2", "ddp", 2, replace(base, train=TrainConfig(seed=7)),
                  shifted(1.0), 0.910, 0.5, [48, 48])])
    return band, knobs


def test_each_run_against_seq_fp32(sweeps):
    from dptrain.study.matrix import FALLBACK_ATOL, ROUND_OFF, build_matrix, load_runs

    rows = {r["knob"]: r for r in build_matrix(load_runs(list(sweeps)))}
    assert set(rows) == {"none", "zero=True", "grad_compress=fp16"}
    assert rows["zero=True"]["verdict"] == "identical"
    assert rows["none"]["verdict"] == "round-off"
    assert rows["grad_compress=fp16"]["verdict"] == "differs"
    # The limit comes from the plain ddp run of the same computation (it only reorders sums).
    assert rows["none"]["round_off_limit"] == pytest.approx(ROUND_OFF * 1e-6, rel=1e-3)
    assert rows["none"]["round_off_limit"] != FALLBACK_ATOL
    assert rows["grad_compress=fp16"]["max_param_diff"] == pytest.approx(0.1, rel=1e-5)
    fp16 = rows["grad_compress=fp16"]
    assert (fp16["band_low"], fp16["band_high"], fp16["band_runs"]) == (
        pytest.approx(0.0), pytest.approx(0.010), 3)
    assert fp16["seed_spread"] == pytest.approx(0.010)
    assert fp16["accuracy_diff"] == pytest.approx(0.030) and fp16["in_band"] is False
    assert rows["none"]["in_band"] is True
    # Against the plain ddp run at the same nproc: ZeRO changes nothing computed.
    assert rows["zero=True"]["plain_param_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert rows["none"]["plain_param_diff"] == 0.0
    assert rows["none"]["time_saved"] == pytest.approx(0.5)  # 50 ms against 100 ms per update
    assert fp16["time_saved"] == pytest.approx(-1.0)
    assert rows["zero=True"]["model_state_bytes"] == 240  # the largest rank's
    assert rows["zero=True"]["peak_rss_bytes"] == 300 << 20


def test_the_command_writes_csv_markdown_and_figure(sweeps, tmp_path):
    band, knobs = sweeps
    result = run_cli("matrix", str(band), str(knobs), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "| 3,2 |" not in result.stdout and "| 16,16 | zero=True | ddp × 2 |" in result.stdout
    assert (tmp_path / "out" / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "out" / "matrix.csv").read_text().splitlines()
    assert lines[0].startswith("knob,mode,nproc,reference,max_param_diff") and len(lines) == 4


def test_sweeps_without_a_reference_are_a_user_error(sweeps):
    from dptrain.errors import UserError
    from dptrain.study.matrix import build_matrix, load_runs

    _, knobs = sweeps
    with pytest.raises(UserError, match="no run has a seq reference"):
        build_matrix(load_runs([knobs]))
