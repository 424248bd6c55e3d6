"""The parity guarantee, on real workers: seq, ddp and fsdp end with the same parameters."""

import json

import pytest

from conftest import assert_same_parameters, load_state, train

# Run name -> mode and flags. ddp sums gradients through shared memory on one CPU node by
# default; ddp-gloo checks the process-group path that other setups use.
RUNS = {"seq": ("seq", []), "ddp": ("ddp", []),
        "ddp-gloo": ("ddp", ["--grad-sync", "collective"]), "fsdp": ("fsdp", [])}
# Adam at the default batch; and plain SGD, which (unlike Adam) shows any error in how the rank
# gradients are scaled, on batches that split unevenly over 2 ranks (3001 = 1501 + 1500) with an
# uneven tail (42000 - 13*3001 = 2987 = 1494 + 1493) that is trained on.
# Each case: its flags, the least test accuracy a working run reaches after one epoch (MSE with
# SGD learns slowly: 14 updates take it from 10% to about 27%), and the absolute tolerance.
# Adam divides each gradient by its running RMS, so for weights of almost-never-lit border pixels
# it turns round-off into steps of up to lr: one such weight was seen 2.4e-5 off on a 16-core
# machine (different thread counts, different summation order). Sharding the wrong samples moves
# weights by about 1e-2. SGD passes round-off through unamplified.
CASES = {
    "adam-default": (["--epochs", "1"], 0.85, 1e-4),
    "sgd-uneven-tail": (["--epochs", "1", "--batch-size", "3001", "--keep-last",
                         "--optimizer", "sgd", "--lr", "2", "--loss", "mse"], 0.2, 1e-5),
}


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    flags, least_accuracy, atol = CASES[request.param]
    runs = {name: (root / name, train(mode, root / name, *flags, *extra))
            for name, (mode, extra) in RUNS.items()
            if (name, request.param) != ("seq", "adam-default")}
    runs.setdefault("seq", request.getfixturevalue("seq_one_epoch"))  # the same run, shared
    return runs, least_accuracy, atol


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "ddp-gloo", "fsdp"])
def test_same_parameters_as_seq(runs, name):
    runs, _, atol = runs
    assert_same_parameters(load_state(runs["seq"][0]), load_state(runs[name][0]), atol=atol)


@pytest.mark.slow
def test_gradient_sums(runs):
    from dptrain.config import cpu_cores
    from dptrain.distributed.shm_sum import supported

    runs, _, _ = runs
    shm = "shm" if supported() and cpu_cores() >= 2 else "collective"  # auto's choice
    assert {name: summary["grad_sync"] for name, (_, summary) in runs.items()} == {
        "seq": "none", "ddp": shm, "ddp-gloo": "collective", "fsdp": "collective"}


@pytest.mark.slow
def test_same_metrics_in_every_mode(runs):
    runs, _, _ = runs
    seq = runs["seq"][1]
    for name in ("ddp", "ddp-gloo", "fsdp"):
        summary = runs[name][1]
        assert summary["world_size"] == 2
        assert summary["test_accuracy"] == pytest.approx(seq["test_accuracy"], abs=2e-4)
        assert summary["test_loss"] == pytest.approx(seq["test_loss"], rel=1e-4)
        assert summary["updates_per_epoch"] == seq["updates_per_epoch"]


@pytest.mark.slow
def test_uneven_case_trains_the_tail(runs):
    runs, _, _ = runs
    summary = runs["seq"][1]
    if summary["global_batch"] == 3001:
        assert (summary["updates_per_epoch"], summary["samples_per_epoch"]) == (14, 42000)


@pytest.mark.slow
def test_run_folder_contents(runs):
    runs, least_accuracy, _ = runs
    for name, (out, summary) in runs.items():
        assert {p.name for p in out.iterdir()} >= {"config.toml", "metrics.jsonl", "summary.json",
                                                   "model.pt"}
        for key in ("mode", "world_size", "global_batch", "updates_per_epoch", "lr", "epochs",
                    "test_accuracy", "test_loss", "train_seconds", "wall_seconds"):
            assert key in summary, key
        assert summary["mode"] == RUNS[name][0]
        assert least_accuracy < summary["test_accuracy"] <= 1.0
        assert 0 < summary["train_seconds"] < summary["wall_seconds"]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in lines] == [1]
        assert lines[0]["samples_per_second"] > 0
        assert f"world_size = {summary['world_size']}" in (out / "config.toml").read_text()


def test_fsdp_units_follow_layer_size():
    """The default model is one FSDP unit (the root's); a wide one gets a unit per big layer."""
    from dptrain.components.model import MLP
    from dptrain.distributed.strategy import own_units

    assert own_units(MLP()) == []
    wide = MLP((4096, 4096))
    assert own_units(wide) == [wide.layers[0], wide.layers[1]]


@pytest.mark.slow
def test_fsdp_with_a_unit_per_layer_matches_seq(tmp_path, seq_one_epoch):
    """The path of wide models (each layer gathered in its own forward, no fused loss), forced
    onto the default model in real workers, computes what seq computes."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "per_layer.py"
    script.write_text("import dptrain.distributed.strategy\n"
                      "dptrain.distributed.strategy.OWN_UNIT_BYTES = 0  # every layer its own unit\n"
                      "from dptrain.components.model import MLP\n"
                      "assert len(dptrain.distributed.strategy.own_units(MLP())) == 3\n"
                      "from dptrain.worker import main\n"
                      "main()\n")
    out = tmp_path / "fsdp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), "--mode", "fsdp", "--device", "cpu", "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_parameters(load_state(seq_one_epoch[0]), load_state(out), atol=1e-4)


@pytest.mark.slow
def test_same_noise_scale_in_every_parallel_mode(runs):
    """ddp's bucket, gloo's or shared memory's, and fsdp's reduce-scatter input are the same
    rank gradients: the same noise-scale estimate (components/noise.py), up to the round-off
    by which their parameters differ (tr(Sigma) is a difference of two close norms: 1.6e-4
    apart for fsdp in the SGD case); seq has none."""
    runs, _, _ = runs
    records = {name: json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
               for name, (out, _) in runs.items()}
    assert "noise_scale" not in records["seq"]
    for name in ("ddp-gloo", "fsdp"):
        for key in ("grad_sq", "trace_cov", "noise_scale"):
            assert records[name][key] == pytest.approx(records["ddp"][key], rel=1e-3), (name, key)
