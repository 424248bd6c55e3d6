"""Checkpoint folders without a process group: atomic writes, verification, fallback, pruning,
RNG states, the resume config rule, and the NaN stop of the one loop (seq, in this process)."""

import json
import random

import numpy as np
import pytest
import torch

from dptrain.storage import checkpoint
from dptrain.storage.checkpoint import CheckpointError
from dptrain.config import build_config, resolve
from dptrain.components.model import MLP
from dptrain.distributed.strategy import STATE_FILE, DistEnv, Strategy
from dptrain.components.step import make_optimizer

CONFIG = build_config({}, {"epochs": 5, "batch_size": 4096})
PLAN = resolve(CONFIG, mode="seq", world_size=1, n_train=42000)


def made_up_record(epoch):
    """A sane metrics record of `epoch` (its lr that of the plan)."""
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 / epoch,
            "val_accuracy": 0.5, "lr": PLAN.lr_at(epoch * PLAN.updates_per_epoch - 1),
            "epoch_seconds": 0.1, "val_seconds": 0.01, "samples_per_second": 1e5,
            "checkpoint_seconds": 0.0}


def write_checkpoints(run_dir, epochs, keep=10):
    """Checkpoints of a small model after each of `epochs` (made-up metrics)."""
    strategy = Strategy(DistEnv(), torch.device("cpu"))
    torch.manual_seed(0)
    model = MLP()
    optimizer = make_optimizer(CONFIG.optim, model.parameters(), 0.01)
    records = [made_up_record(epoch) for epoch in range(1, min(epochs))]
    for epoch in epochs:
        model.layers[0].bias.data.fill_(epoch)
        records.append(made_up_record(epoch))
        meta = checkpoint.manifest(epoch=epoch, step=epoch * PLAN.updates_per_epoch, mode="seq",
                                   world_size=1, config=CONFIG, plan=PLAN, records=records,
                                   train_seconds=float(epoch), checkpoint_format="torch")
        checkpoint.write(strategy, model, optimizer, run_dir, meta, keep)
    return model


def test_written_folder_is_complete_and_found(tmp_path):
    write_checkpoints(tmp_path, [1, 2])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-0001", "epoch-0002"]  # no temporary folder left behind
    found, skipped = checkpoint.latest(tmp_path)
    assert (found.epoch, skipped) == (2, [])
    assert [r["epoch"] for r in found.records] == [1, 2]
    assert found.records[-1]["checkpoint_seconds"] >= 0
    assert set(found.meta["files"]) == {STATE_FILE}
    state = torch.load(found.path / STATE_FILE, weights_only=True)
    assert torch.equal(state["model"]["layers.0.bias"], torch.full((16,), 2.0))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "meta.json").unlink(), "no readable meta.json"),
    (lambda p: (p / "meta.json").write_text("{\"epoch\": 2, "), "no readable meta.json"),
    (lambda p: (p / STATE_FILE).write_bytes((p / STATE_FILE).read_bytes()[:-10]), "checksum"),
    (lambda p: (p / STATE_FILE).unlink(), "state.pt is missing"),
    (lambda p: (p / "meta.json").write_text(
        json.dumps({**json.loads((p / "meta.json").read_text()), "complete": False})),
     "does not mark it complete"),
])
def test_damaged_newest_falls_back_to_the_previous(tmp_path, damage, reason):
    write_checkpoints(tmp_path, [1, 2])
    damage(tmp_path / "checkpoints" / "epoch-0002")
    found, skipped = checkpoint.latest(tmp_path)
    assert found.epoch == 1
    assert len(skipped) == 1 and "epoch-0002" in skipped[0] and reason in skipped[0]
    with pytest.raises(CheckpointError, match=reason):
        checkpoint.find(tmp_path / "checkpoints" / "epoch-0002")


def test_a_half_written_folder_never_counts(tmp_path):
    write_checkpoints(tmp_path, [1])
    (tmp_path / "checkpoints" / ".epoch-0002.tmp").mkdir()  # a crash during the next save
    assert checkpoint.latest(tmp_path)[0].epoch == 1
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        checkpoint.find(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        checkpoint.find(tmp_path / "nowhere")


def test_keep_prunes_the_oldest(tmp_path):
    write_checkpoints(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch-0003", "epoch-0004"]


def test_a_damaged_folder_of_the_same_epoch_is_replaced(tmp_path):
    write_checkpoints(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "epoch-0002" / "meta.json").unlink()
    write_checkpoints(tmp_path, [2])
    found, skipped = checkpoint.latest(tmp_path)
    assert (found.epoch, skipped) == (2, [])


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))  # as stored in meta.json
    first = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(saved)
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_resume_config_keeps_the_run_and_allows_only_some_changes(tmp_path):
    write_checkpoints(tmp_path, [1, 2])
    flags = {"epochs": None, "batch_size": None, "lr": None, "nproc": None, "config": None}
    config = checkpoint.resume_config("seq", tmp_path, {**flags, "epochs": 8, "threads": 1})
    assert (config.train.epochs, config.train.batch_size, config.run.out) == (8, 4096, str(tmp_path))
    with pytest.raises(checkpoint.UserError, match=r"batch_size 4096 -> 512.*would change the run"):
        checkpoint.resume_config("seq", tmp_path, {**flags, "batch_size": 512})
    with pytest.raises(checkpoint.UserError, match="written by `dptrain seq`"):
        checkpoint.resume_config("ddp", tmp_path, flags)
    with pytest.raises(checkpoint.UserError, match="--epochs must be at least that"):
        checkpoint.resume_config("seq", tmp_path, {**flags, "epochs": 1})
    with pytest.raises(checkpoint.UserError, match="drop --out"):
        checkpoint.resume_config("seq", tmp_path, {**flags, "out": str(tmp_path / "other")})


def test_config_and_resume_auto(tmp_path):
    flags = {"resume": "auto", "out": str(tmp_path / "run"), "config": None}
    config, resume = checkpoint.config_and_resume("seq", flags)
    assert resume == "" and config.run.out == str(tmp_path / "run")  # nothing yet: start it
    write_checkpoints(tmp_path / "run", [1])
    assert checkpoint.config_and_resume("seq", flags)[1] == str(tmp_path / "run")
    with pytest.raises(checkpoint.UserError, match="--resume auto .* give --out"):
        checkpoint.config_and_resume("seq", {"resume": "auto", "config": None})


def test_checkpoint_flags_are_validated():
    from dptrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        build_config({}, {"keep": 0, "checkpoint_every": -1, "max_restarts": -2})
    for key in ("run.keep: must be >= 1", "run.checkpoint_every", "launch.max_restarts"):
        assert key in str(e.value)


def seq_run_error(out) -> str:
    """The one-line error of a 3-epoch seq run (10 updates an epoch) in this process."""
    from dptrain.errors import UserError
    from dptrain.worker import run

    config = build_config({}, {"epochs": 3, "batch_size": 4096, "device": "cpu", "out": str(out)})
    with pytest.raises(UserError) as e:
        run("seq", config)
    return str(e.value)


def test_nan_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The one loop, in this process: an inf loss at update 13 (epoch 2 at 10 per epoch). The
    host reads the device once per epoch, so epoch 2 runs to its end with every update from 13
    on skipped (test_step.py shows they are), then the run stops before checkpointing it."""
    real, updates = MLP.forward, []

    def forward_that_overflows(self, x, targets=None):
        out = real(self, x, targets)
        if targets is not None:  # a training step's loss, not evaluation's logits
            updates.append(1)
            if len(updates) == 13:
                return out * float("inf")
        return out

    monkeypatch.setattr(MLP, "forward", forward_that_overflows)
    message = seq_run_error(tmp_path / "run")
    assert "non-finite" in message and "(this rank's loss: inf)" in message
    assert "epoch 2, step 3 of 10 (update 13 of the run)" in message
    assert "epoch-0001" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-0001"]
    assert len(updates) == 20  # stopped at the end of epoch 2
    found, _ = checkpoint.latest(tmp_path / "run")
    state = torch.load(found.path / STATE_FILE, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_diverged_parameters_are_never_checkpointed(tmp_path, monkeypatch):
    """A weight that turns non-finite while every loss and gradient stays finite (Adam's state
    can overflow): the per-step check of the gradients misses it, the check before each
    checkpoint does not."""
    from dptrain import train as train_module

    real_epoch = train_module.train_epoch

    def epoch_that_overflows_a_weight(step, samples, order, plan, strategy, first_step,
                                      telemetry):
        loss = real_epoch(step, samples, order, plan, strategy, first_step, telemetry)
        if first_step == plan.updates_per_epoch:  # the second epoch (first_step = 10)
            with torch.no_grad():
                next(step.model.parameters())[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(train_module, "train_epoch", epoch_that_overflows_a_weight)
    message = seq_run_error(tmp_path / "run")
    assert "parameters became non-finite during epoch 2" in message
    assert "epoch-0001" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-0001"]


def test_fsdp_checkpoint_of_cpu_ranks_never_touches_cuda(tmp_path, monkeypatch):
    """On a GPU machine, forked CPU workers failed in dcp.save: its writer asked for a CUDA
    stream ("Cannot re-initialize CUDA in forked subprocess")."""
    import torch.distributed as dist

    from dptrain.config import SystemConfig
    from dptrain.distributed.strategy import FSDPStrategy

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU rank's checkpoint touched CUDA")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        strategy = FSDPStrategy(DistEnv(), torch.device("cpu"), "gloo", SystemConfig(device="cpu"))
        model = strategy.wrap(MLP())
        optimizer = make_optimizer(build_config({}).optim, model.parameters(), 0.01)
        model(torch.rand(4, 784)).sum().backward()
        optimizer.step()
        before = strategy.full_state_dict(model)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
        for name in ("current_stream", "Stream", "synchronize", "_lazy_init"):
            monkeypatch.setattr(torch.cuda, name, no_cuda)
        strategy.save_state(model, optimizer, tmp_path)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        strategy.load_state(model, optimizer, tmp_path)
        monkeypatch.undo()
        after = strategy.full_state_dict(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        dist.destroy_process_group()


def test_a_diverging_loss_stops_like_a_nan(tmp_path):
    """Adam at lr 1e9: the loss reaches ~1e28 with no NaN; the run stops after epoch 1, in one
    line, with nothing checkpointed, and records why (stopped.json)."""
    from dptrain.config import build_config
    from dptrain.errors import UserError
    from dptrain.worker import run

    out = tmp_path / "run"
    config = build_config({}, {"epochs": 3, "lr": 1e9, "threads": 1, "device": "cpu",
                               "out": str(out)})
    with pytest.raises(UserError, match="diverged: epoch 1's mean train loss is .*e\\+"):
        run("seq", config)
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    assert "diverged" in (out / "stopped.json").read_text()
