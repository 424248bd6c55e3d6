"""A trainer's basics: gradient clipping, lr schedules, the best checkpoint and early stopping,
and using a model before its run ends (checkpoints, a bare model.pt, an unfinished run's plot).

One run per mode (seq in this process, ddp and fsdp on 2 real gloo workers) shares every flag:
a clip threshold that clips most updates, a cosine schedule, --keep-best and an --early-stop
that fires at epoch 3 of 10 (epoch 2 is the best). The modes must agree on the parameters, the
epoch they stop at and the best checkpoint; the seq run is then resumed mid-schedule.
"""

import functools
import json
import math
import shutil

import pytest
import torch

from conftest import (assert_identical_parameters, assert_same_parameters, load_state,
                      metric_values, run_cli, train)
from dptrain.config import build_config, resolve
from dptrain.errors import UserError
from dptrain.storage import checkpoint

# lr 0.06 with seed 4 stops at epoch 3: validation accuracy 0.8884, 0.9168, then 0.9154 (20
# images fewer right than epoch 2, where the modes differ by round-off only). Gradient norms
# are ~0.2-1.7 at these settings: 0.5 clips most updates.
FLAGS = {"epochs": 10, "lr": 0.06, "seed": 4, "clip_grad_norm": 0.5, "lr_schedule": "cosine",
         "early_stop": 1, "keep_best": True}
CLI_FLAGS = [arg for key, value in FLAGS.items() if key != "keep_best"
             for arg in (f"--{key.replace('_', '-')}", str(value))] + ["--keep-best"]
STOP, BEST = 3, 2


def seq_run(out, *, resume: str = "", **flags):
    """dptrain seq in this process (no CLI: it is not the point here); returns the summary."""
    from dptrain.worker import run

    config, resume = checkpoint.config_and_resume(
        "seq", {"out": str(out), "device": "cpu", "resume": resume, **flags})
    return run("seq", config, resume=resume)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (run folder, summary)}, and the gradient norms of seq's updates before and after
    clipping. ddp and fsdp write only the best checkpoint (--checkpoint-every 0)."""
    from dptrain.distributed.strategy import Strategy

    root = tmp_path_factory.mktemp("basics")
    norms, clip = [], Strategy.clip_gradients

    def measured(self, model, max_norm):
        grads = [p.grad for p in model.parameters()]
        before = torch.nn.utils.get_total_norm(grads).item()
        clip(self, model, max_norm)
        norms.append((before, torch.nn.utils.get_total_norm(grads).item()))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Strategy, "clip_gradients", measured)
        seq = seq_run(root / "seq", **FLAGS)
    runs = {"seq": (root / "seq", seq)}
    for mode in ("ddp", "fsdp"):
        runs[mode] = (root / mode, train(mode, root / mode, *CLI_FLAGS, "--checkpoint-every", "0"))
    return runs, norms


@functools.cache
def common_pixels() -> torch.Tensor:
    """The pixels lit (non-zero) in at least 1% of the training images (494 of 784)."""
    from dptrain.components.data import load_mnist, split_indices

    mnist = load_mnist()
    lit = (mnist.images[split_indices(len(mnist.labels), 0).train] > 0).mean(axis=0)
    return torch.from_numpy(lit >= 0.01)


def assert_same_model(a: dict, b: dict) -> None:
    """Equal up to round-off, but for the first layer's weights of pixels lit in under 1% of
    the training images. Adam moves those on gradients of a few samples, and round-off grows
    there over epochs at this lr: seen 3.4e-4 off (elsewhere 1e-5) after 3 epochs. Summing
    wrong shards, or clipping by a rank's own norm, moves every weight by 1e-3 or more."""
    common, first = common_pixels(), "layers.0.weight"
    assert_same_parameters({k: v for k, v in a.items() if k != first},
                           {k: v for k, v in b.items() if k != first}, atol=1e-4)
    torch.testing.assert_close(a[first][:, common], b[first][:, common], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[first][:, ~common], b[first][:, ~common], rtol=0, atol=1e-2)


@pytest.mark.slow
def test_clipping_scales_large_gradients_to_the_threshold(runs):
    _, norms = runs
    clipped = [after for before, after in norms if before > 0.5]
    assert len(clipped) > len(norms) / 2  # the threshold clips most updates
    assert all(after == pytest.approx(0.5, rel=1e-4) for after in clipped)
    assert all(after == before for before, after in norms if before <= 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_mode_clips_schedules_and_stops_alike(runs, mode):
    """The same parameters as seq (clipping by the norm over all ranks), the same lr at every
    epoch, and the same early stop after the same best epoch."""
    runs, _ = runs
    (seq_dir, seq), (run_dir, summary) = runs["seq"], runs[mode]
    assert_same_model(load_state(seq_dir), load_state(run_dir))
    for s in (seq, summary):
        assert (s["epochs_trained"], s["stopped_early"], s["best_epoch"]) == (STOP, True, BEST)
        assert s["lr_schedule"] == "cosine 0.06 -> 0 over epochs 1-10"
    records, seq_records = metric_values(run_dir), metric_values(seq_dir)
    assert [r["lr"] for r in records] == [r["lr"] for r in seq_records]
    # The cosine after epoch 3's last update (41 updates per epoch, 410 in all).
    assert seq_records[-1]["lr"] == pytest.approx(0.06 * (1 + math.cos(math.pi * 122 / 410)) / 2)
    for r, s in zip(records, seq_records):
        assert r["val_accuracy"] == pytest.approx(s["val_accuracy"], abs=2e-4)
    assert summary["test_accuracy"] == pytest.approx(seq["test_accuracy"], abs=2e-4)


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_apart_and_is_the_best_epochs_model(runs):
    from dptrain.inference.evaluate import evaluate_run, load

    runs, _ = runs
    for mode, (run_dir, _) in runs.items():
        assert [p.name for p in (run_dir / "checkpoints" / "best").iterdir()] == ["epoch-0002"]
    seq_dir = runs["seq"][0]
    assert sorted(p.name for p in (seq_dir / "checkpoints").iterdir()) == [
        "best", "epoch-0002", "epoch-0003"]  # --keep 2, and the stop epoch's checkpoint
    best = load(seq_dir / "checkpoints" / "best").model.state_dict()
    assert_identical_parameters(best, load(seq_dir / "checkpoints" / "epoch-0002").model.state_dict())
    assert not torch.equal(best["layers.0.weight"], load_state(seq_dir)["layers.0.weight"])
    # fsdp's best (a DCP checkpoint) holds the same model.
    fsdp_best = load(runs["fsdp"][0] / "checkpoints" / "best")
    assert_same_model(best, fsdp_best.model.state_dict())
    assert fsdp_best.source.endswith("best/epoch-0002, epoch 2")
    assert evaluate_run(runs["fsdp"][0] / "checkpoints" / "best").accuracy == pytest.approx(
        evaluate_run(seq_dir / "checkpoints" / "best").accuracy, abs=2e-4)


@pytest.mark.slow
def test_resume_mid_schedule_is_exact_and_an_early_stop_is_final(runs, tmp_path):
    """A crash after epoch 2's checkpoint, resumed: epoch 3 trains at its cosine lr, stops
    early again, and ends bit for bit as the uninterrupted run. Resumed again: nothing to do."""
    runs, _ = runs
    seq_dir = runs["seq"][0]
    out = tmp_path / "run"
    shutil.copytree(seq_dir, out)
    for name in ("summary.json", "model.pt"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "epoch-0003")
    summary = seq_run(out, resume=str(out))
    assert (summary["resumed_from_epoch"], summary["epochs_trained"]) == (BEST, STOP)
    assert_identical_parameters(load_state(seq_dir), load_state(out))
    assert metric_values(out) == metric_values(seq_dir)
    with pytest.raises(checkpoint.Finished, match=r"stopped early at epoch 3: 1 epoch without a "
                                                  r"better val_accuracy than epoch 2's 0\.91"):
        checkpoint.config_and_resume("seq", {"resume": str(out), "epochs": 20})
    with pytest.raises(UserError, match="--epochs 20 would change its cosine lr schedule, which "
                                        "decays over the run's 10 epochs"):
        checkpoint.config_and_resume("seq", {"resume": str(out), "epochs": 20, "early_stop": 0})
    with pytest.raises(UserError, match="a run goes on from its newest checkpoint, not its best"):
        checkpoint.config_and_resume("seq", {"resume": str(out / "checkpoints" / "best")})
    # The manifest's check of each epoch's lr knows the schedule: a constant lr is refused.
    meta_file = out / "checkpoints" / "epoch-0003" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"][1]["lr"] = 0.06
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="metrics of epoch 2: lr 0.06, but its "
                                                         "config gives 0.054"):
        checkpoint.verify(meta_file.parent)


@pytest.mark.slow
def test_a_model_before_its_run_ends(runs, tmp_path):
    """evaluate and predict take an unfinished run (its newest checkpoint), a checkpoint folder
    or an exported model.pt (--activation: nothing beside it names one); plot draws the
    unfinished run's epochs so far."""
    from rich.console import Console

    from dptrain.inference.evaluate import evaluate_run, predict_files
    from dptrain.study.plots import plot_runs, read_run
    from test_predict import draw

    runs, _ = runs
    seq_dir, seq = runs["seq"]
    out = tmp_path / "unfinished"
    shutil.copytree(seq_dir, out)
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "train_lo')  # a line being written
    result = evaluate_run(out)
    assert result.source.endswith("epoch-0003, epoch 3 (its newest checkpoint: the run has no "
                                  "model.pt yet)")
    assert result.accuracy == pytest.approx(seq["test_accuracy"], abs=2e-4)
    summary, metrics = read_run(out)
    assert summary["unfinished"] and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert plot_runs([out, seq_dir], tmp_path / "plot.png").stat().st_size > 10_000

    exported = tmp_path / "best.pt"
    checkpoint.export(out / "checkpoints" / "best", exported)
    with pytest.raises(UserError, match="pass --activation relu"):
        evaluate_run(exported)
    assert evaluate_run(exported, activation="relu").accuracy == \
        evaluate_run(out / "checkpoints" / "best").accuracy

    one, bad = draw(tmp_path / "one.png", "1"), tmp_path / "bad.png"
    bad.write_text("not a picture")
    console = Console(file=(tmp_path / "out.jsonl").open("w"))
    assert predict_files(exported, [one, bad], console, as_json=True, activation="relu") is False
    console.file.close()
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [str(one), str(bad)]
    assert lines[0]["digit"] == 1 and sum(lines[0]["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert "not an image" in lines[1]["error"]


def test_version():
    from dptrain import __version__

    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"dptrain {__version__}\n")


def plan_of(**flags):
    config = build_config({}, {"epochs": 10, "batch_size": 4200, **flags})
    return resolve(config, mode="seq", world_size=1, n_train=42000)  # 10 updates per epoch


def test_schedule_shapes():
    """Each schedule as a function of the update: after the warmup it starts at the scaled lr;
    cosine and linear end at the final fraction, step steps down at whole epochs."""
    constant = plan_of(lr_scaling="linear", ref_batch_size=2100)
    assert constant.lr == pytest.approx(0.02)
    assert [constant.lr_at(s) for s in (0, 50, 99)] == [constant.lr] * 3  # exactly, as ever
    cosine = plan_of(lr_schedule="cosine", lr_final_fraction=0.1, warmup_epochs=2,
                     lr_scaling="linear", ref_batch_size=2100)
    assert [cosine.lr_at(s) for s in (0, 10, 20)] == pytest.approx([0.01, 0.015, 0.02])
    assert cosine.lr_at(60) == pytest.approx(0.02 * (0.1 + 0.9 / 2))  # halfway: the midpoint
    assert cosine.lr_at(100) == pytest.approx(0.002)  # the run's end; and after it (a resume)
    lrs = [cosine.lr_at(s) for s in range(20, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0.002
    linear = plan_of(lr_schedule="linear")
    assert [linear.lr_at(s) for s in (0, 25, 50, 99)] == pytest.approx(
        [0.01, 0.0075, 0.005, 0.0001])
    step = plan_of(lr_schedule="step", lr_step_epochs=3, lr_step_factor=0.5)
    assert [step.lr_at(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.0025, 0.00125])
    assert step.schedule_text() == "step 0.01 x 0.5 every 3 epochs from epoch 1"
    assert cosine.schedule_text() == ("warmup 0.01 -> 0.02 over epochs 1-2, then cosine 0.02 -> "
                                      "0.002 over epochs 3-10")


@pytest.mark.parametrize("flags, fragment", [
    ({"lr_schedule": "exp"}, "optim.lr_schedule: expected one of constant, cosine, linear, step"),
    ({"lr_schedule": "cosine", "lr_final_fraction": 1.5}, "optim.lr_final_fraction: must be in [0, 1]"),
    ({"lr_schedule": "cosine", "warmup_epochs": 10, "lr_scaling": "linear"},
     "warmup_epochs 10 leaves none of the 10 epochs"),
    ({"lr_step_epochs": 2}, "--lr-step-epochs is used by --lr-schedule step only"),
    ({"lr_schedule": "step", "lr_final_fraction": 0.1}, "--lr-final-fraction is used by the cosine"),
    ({"clip_grad_norm": -1.0}, "optim.clip_grad_norm: must be >= 0"),
    ({"early_stop": -1}, "train.early_stop: must be >= 0"),
    ({"best_metric": "val_loss"}, "--best-metric is not used without --early-stop or --keep-best"),
    ({"early_stop": 2, "best_metric": "accuracy"}, "train.best_metric: expected one of"),
])
def test_schedule_clipping_and_early_stop_flags_are_checked(flags, fragment):
    from dptrain.config import ConfigError
    from dptrain.flags import config_from_flags

    with pytest.raises(ConfigError) as error:
        config_from_flags({"epochs": 10, **flags})
    assert fragment in str(error.value)


def test_best_and_early_stop_follow_the_records():
    from dptrain.components.best import best_record, early_stop_line, is_new_best

    records = [{"epoch": e, "val_accuracy": a, "val_loss": l}
               for e, a, l in [(1, 0.90, 0.30), (2, 0.92, 0.31), (3, 0.92, 0.25), (4, 0.91, 0.26)]]
    assert best_record(records, "val_accuracy")["epoch"] == 2  # a tie is no improvement
    assert best_record(records, "val_loss")["epoch"] == 3
    assert is_new_best(records[:3], "val_loss") and not is_new_best(records[:3], "val_accuracy")
    train = build_config({}, {"early_stop": 2}).train
    assert early_stop_line(records[:3], train) == ""
    assert early_stop_line(records, train) == ("stopping early after epoch 4: 2 epochs without a "
                                               "better val_accuracy than epoch 2's 0.9200 "
                                               "(--early-stop 2)")
    train = build_config({}, {"early_stop": 2, "best_metric": "val_loss"}).train
    assert early_stop_line(records, train) == ""


def test_clipping_keeps_the_nan_contract_and_never_syncs(monkeypatch):
    """Clipping scales a large gradient to the threshold, leaves a small one as it is, keeps a
    NaN gradient non-finite (the guard has flagged it, so the update is skipped), and asks the
    device nothing (no .item(), no bool of a tensor)."""
    from dptrain.components.model import MLP
    from dptrain.distributed.strategy import DistEnv, Strategy

    strategy, model = Strategy(DistEnv(), torch.device("cpu")), MLP()

    def clip():
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__"):
                def sync(*_args, name=name):
                    raise AssertionError(f"a host sync: Tensor.{name}")
                patch.setattr(torch.Tensor, name, sync)
            strategy.clip_gradients(model, 1.0)
        return [p.grad for p in model.parameters()]

    for scale in (10.0, 1e-3):
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        before = [p.grad.clone() for p in model.parameters()]
        grads = clip()
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
        if scale < 1:  # far below the threshold: untouched
            assert all(torch.equal(a, b) for a, b in zip(before, grads))
        else:
            assert norm == pytest.approx(1.0, rel=1e-5)
    model.layers[1].weight.grad[0, 0] = float("nan")
    assert all(torch.isnan(g).all() for g in clip())
