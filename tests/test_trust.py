"""Checkpoint folders from anyone: malicious pickles run nothing, tampered manifests are passed
over (or refused in one line) and never obeyed, nothing in a run folder is touched before the
checkpoint to resume from has been fully checked, and the --resume / export rough edges.

A malicious file here creates a marker file when unpickled by plain pickle; each test first
shows that it does (so that it cannot pass by accident), then that dptrain refuses it and the
marker never appears.
"""

import hashlib
import json
import pickle
import re
import shutil

import pytest
import torch

from conftest import assert_identical_parameters, load_state, run_cli, train
from dptrain.storage import checkpoint
from dptrain.storage.checkpoint import CheckpointError, Finished
from dptrain.errors import UserError
from test_cli import assert_one_line_error

N_TRAIN = 42000  # MNIST's 70,000 images, 60% for training


class Payload:
    """Unpickled by plain pickle, it runs code: here, it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(folder, name, data: bytes) -> None:
    """Write `name` into a checkpoint folder, with its size and SHA-256 rewritten in meta.json
    (as an attacker would), so that the checksums pass."""
    (folder / name).write_bytes(data)
    edit_meta(folder, lambda meta: meta["files"].__setitem__(
        name, [len(data), hashlib.sha256(data).hexdigest()]))


def edit_meta(folder, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def run_files(run_dir) -> dict:
    """Every file of a run folder (checkpoints included) -> its bytes."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A finished 1-epoch fsdp run on 2 workers (one checkpoint, epoch-0001)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    train("fsdp", out, "--epochs", "1", "--batch-size", "4096")
    return out


@pytest.fixture
def seq_copy(trained_run, tmp_path):
    """A copy of the session's finished 3-epoch seq run (checkpoints epoch-0002, epoch-0003)."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def test_a_genuine_fsdp_checkpoint_loads(fsdp_run, tmp_path):
    found, skipped = checkpoint.resumable(fsdp_run, N_TRAIN)  # the trial load, on the CPU
    assert (found.epoch, skipped) == (1, [])
    checkpoint.export(fsdp_run, tmp_path / "model.pt")
    assert_identical_parameters(load_state(fsdp_run), torch.load(tmp_path / "model.pt"))


def test_malicious_dcp_metadata_runs_nothing(fsdp_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir)
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists(), "the payload must run under plain pickle"
    plant(run_dir / "checkpoints" / "epoch-0001", ".metadata", pickle.dumps(Payload(marker)))
    before = run_files(run_dir)

    result = run_cli("export", str(run_dir), "--out", str(tmp_path / "model.pt"))
    assert_one_line_error(result, ".metadata: refused", "builtins.exec")
    result = run_cli("fsdp", "--nproc", "2", "--device", "cpu", "--resume", str(run_dir),
                     "--epochs", "2")
    assert_one_line_error(result, ".metadata: refused", "builtins.exec")
    with pytest.raises(CheckpointError, match="builtins.exec"):  # what a worker would check
        checkpoint.find(run_dir / "checkpoints" / "epoch-0001")
    assert checkpoint.resumable(run_dir, N_TRAIN)[0] is None
    assert not marker.exists()
    assert not (tmp_path / "model.pt").exists()
    assert run_files(run_dir) == before


def test_malicious_item_in_a_dcp_shard_runs_nothing(fsdp_run, tmp_path):
    """DCP loads a shard's non-tensor items with torch.load(weights_only=False)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dptrain.config import build_config
    from dptrain.components.model import MLP
    from dptrain.components.step import make_optimizer

    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(fsdp_run, run_dir)
    folder = run_dir / "checkpoints" / "epoch-0001"
    evil = tmp_path / "evil"
    def fresh_state():
        model = MLP()
        model_state, optimizer_state = get_state_dict(
            model, make_optimizer(build_config({}).optim, model.parameters(), 0.01))
        return {"model": model_state, "optimizer": optimizer_state}

    state = fresh_state()
    state["optimizer"]["param_groups"][0]["eps"] = Payload(marker)  # a setting's place
    with warnings.catch_warnings():  # one process, no process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=evil)
        dcp.load(fresh_state(), checkpoint_id=evil)
    assert marker.exists(), "the payload must run under DCP's own planner"
    marker.unlink()
    for old in folder.glob("*.distcp"):
        old.unlink()
    edit_meta(folder, lambda meta: meta.__setitem__("files", {}))
    for new in evil.iterdir():
        plant(folder, new.name, new.read_bytes())

    with pytest.raises(UserError, match=r"item optimizer.param_groups.0.eps: refused.*exec"):
        checkpoint.export(run_dir, tmp_path / "model.pt")
    found, skipped = checkpoint.resumable(run_dir, N_TRAIN)
    assert found is None and "refused" in skipped[0]
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    # BUILD with slot state on a class: setattr(StorageMeta, "injected", 1) under plain pickle.
    b"ctorch.distributed.checkpoint.metadata\nStorageMeta\n(N}Vinjected\nI1\nstb.",
    # BUILD on an enum member: its _value_ changed for the whole process under plain pickle.
    b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n(I0\ntR}V_value_\nI7\nsb.",
])
def test_a_metadata_pickle_cannot_alter_the_classes_it_names(tmp_path, payload):
    from torch.distributed.checkpoint import metadata

    from dptrain.storage.safedcp import read_dcp_metadata

    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(UserError, match="refused: it alters a"):
        read_dcp_metadata(tmp_path, {})
    assert "injected" not in vars(metadata.StorageMeta)
    assert metadata._MEM_FORMAT_ENCODING(0).value == 0


def test_malicious_state_and_model_files_are_one_line(seq_copy, tmp_path):
    from dptrain.inference.evaluate import load_model

    marker = tmp_path / "marker"
    folder = seq_copy / "checkpoints" / "epoch-0003"
    plant(folder, "state.pt", pickle.dumps(Payload(marker)))  # not even torch.save's format
    with pytest.raises(UserError, match=r"state.pt: refused"):
        checkpoint.export(folder, tmp_path / "model.pt")
    (folder / "state.pt").unlink()
    torch.save({"model": Payload(marker)}, tmp_path / "state.pt")
    plant(folder, "state.pt", (tmp_path / "state.pt").read_bytes())
    result = run_cli("export", str(folder), "--out", str(tmp_path / "model.pt"))
    assert_one_line_error(result, "state.pt: refused", "Unsupported global: GLOBAL exec")
    found, skipped = checkpoint.resumable(seq_copy, N_TRAIN)  # a resume falls back
    assert found.epoch == 2 and "state.pt: refused" in skipped[0]
    torch.save({"model": Payload(marker)}, seq_copy / "model.pt")
    assert_one_line_error(run_cli("evaluate", str(seq_copy)), "model.pt: refused", "exec")
    with pytest.raises(UserError, match="model.pt: refused"):
        load_model(seq_copy)
    assert not marker.exists()


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


def _edit_record(epoch, key, value):
    return lambda meta: meta["metrics"][epoch - 1].__setitem__(key, value)


def _lr_everywhere(meta):
    """An lr edited consistently in the manifest, but not in the saved optimizer."""
    meta["config"]["optim"]["lr"] = meta["plan"]["lr"] = 0.5
    for record in meta["metrics"]:
        record["lr"] = 0.5


@pytest.mark.parametrize("damage, reason", [
    (lambda meta: meta.pop("files"), "meta.json lacks files"),
    (lambda meta: meta.pop("mode"), "meta.json lacks mode"),
    (lambda meta: meta.pop("rng"), "meta.json lacks rng"),
    (_set("epoch", "five"), "epoch: expected an integer >= 1, got 'five'"),
    (_set("epoch", 5), "says epoch 5, but the folder is epoch-0003"),
    (_set("step", 7), "step 7 is not epoch 3"),
    (lambda meta: meta["config"]["optim"].__setitem__("lr", 0.5), "plan.lr is 0.01, but its config"),
    (_lr_everywhere, "the saved optimizer's lr 0.01 is not the 0.5 of meta.json"),
    (_edit_record(3, "lr", 0.5), "metrics of epoch 3: lr 0.5, but its config gives 0.01"),
    (_edit_record(2, "val_accuracy", 1.7), "metrics of epoch 2: val_accuracy"),
    (_edit_record(1, "train_loss", "low"), "metrics of epoch 1: train_loss"),
    (lambda meta: meta["metrics"].pop(), "metrics: expected the records of epochs 1 to 3"),
    (_edit_record(2, "epoch", 3), "metrics: record 2 is not epoch 2's"),
    (lambda meta: meta["plan"].__setitem__("global_batch", 512), "plan.global_batch is 512"),
    (lambda meta: meta["rng"].__setitem__("torch", "AAAA"), "rng: not the generator states"),
    (lambda meta: meta["files"].__setitem__("../../model.pt", [1, "0" * 64]), "not a file of"),
    (_set("format", "dcp"), "format 'dcp' is not what seq writes"),
    (_set("train_seconds", float("nan")), "train_seconds"),
])
def test_tampered_newest_manifest_is_passed_over(seq_copy, damage, reason):
    edit_meta(seq_copy / "checkpoints" / "epoch-0003", damage)
    found, skipped = checkpoint.resumable(seq_copy, N_TRAIN)
    assert found.epoch == 2
    assert len(skipped) == 1 and "epoch-0003" in skipped[0] and reason in skipped[0], skipped


def resume_in_process(run_dir, **flags):
    """`dptrain seq --resume RUN_DIR [flags]`, in this process (what cli.py does)."""
    from dptrain.worker import run

    config, resume = checkpoint.config_and_resume("seq", {"resume": str(run_dir), **flags})
    return run("seq", config, resume=resume)


def test_an_edited_lr_is_not_obeyed(seq_copy, trained_run, capsys):
    """The newest manifest says lr 0.5: the run falls back and ends exactly as the real one."""
    edit_meta(seq_copy / "checkpoints" / "epoch-0003",
              lambda meta: meta["config"]["optim"].__setitem__("lr", 0.5))
    (seq_copy / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    resume_in_process(seq_copy)
    passed = [line for line in capsys.readouterr().out.splitlines() if "passed over" in line]
    assert len(passed) == 1 and "epoch-0003" in passed[0] and "plan.lr" in passed[0]
    assert_identical_parameters(load_state(trained_run), load_state(seq_copy))
    assert json.loads((seq_copy / "summary.json").read_text())["lr"] == 0.01


@pytest.mark.parametrize("damage, where", [
    (lambda meta: meta.pop("rng"), "lacks rng"),  # found by the CLI's check
    (lambda meta: meta["rng"].__setitem__("torch", "AAAA"), "rng: not the generator states"),
])
def test_a_finished_run_survives_unusable_checkpoints(seq_copy, damage, where):
    """Extending a finished run whose checkpoints are all unusable: one line, and not one
    file of the run is deleted or rewritten (with rng removed, model.pt and summary.json were
    already gone when a KeyError came)."""
    for folder in (seq_copy / "checkpoints").iterdir():
        edit_meta(folder, damage)
    before = run_files(seq_copy)
    with pytest.raises(UserError) as e:
        resume_in_process(seq_copy, epochs=4)
    assert "no complete checkpoint" in str(e.value) or "no usable checkpoint" in str(e.value)
    assert where in str(e.value) and "\n" not in str(e.value)
    assert run_files(seq_copy) == before


def test_resume_takes_the_newest_checkpoint_folder_too(seq_copy):
    checkpoints = seq_copy / "checkpoints"
    flags = {"epochs": 4, "config": None}
    config, resume = checkpoint.config_and_resume(
        "seq", {**flags, "resume": str(checkpoints / "epoch-0003")})
    assert resume == str(seq_copy) and config.run.out == str(seq_copy)
    with pytest.raises(UserError, match=r"newer complete checkpoint, epoch-0003.*--resume "):
        checkpoint.config_and_resume("seq", {**flags, "resume": str(checkpoints / "epoch-0002")})
    with pytest.raises(UserError, match="epoch-0001 does not exist: it was pruned"):
        checkpoint.config_and_resume("seq", {**flags, "resume": str(checkpoints / "epoch-0001")})


def test_a_pruned_checkpoint_is_named_as_such(seq_copy):
    checkpoints = seq_copy / "checkpoints"
    result = run_cli("export", str(checkpoints / "epoch-0001"), "--out", str(seq_copy / "m.pt"))
    assert_one_line_error(result, "epoch-0001 does not exist: it was pruned",
                          "keeps its newest 2 (--keep)", "are epoch-0002, epoch-0003")
    with pytest.raises(CheckpointError, match="the run's newest checkpoint is epoch-0003"):
        checkpoint.find(checkpoints / "epoch-0009")


def test_export_of_a_run_says_what_it_passed_over(seq_copy, tmp_path):
    edit_meta(seq_copy / "checkpoints" / "epoch-0003", lambda meta: meta.pop("rng"))
    result = run_cli("export", str(seq_copy), "--out", str(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr
    assert "the model of" in result.stdout and "epoch-0002 (epoch 2," in result.stdout
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and "passed over" in warnings[0] and "lacks rng" in warnings[0]


def test_resuming_a_finished_run_is_success(seq_copy):
    before = run_files(seq_copy)
    for args in (["--resume", str(seq_copy)], ["--resume", "auto", "--out", str(seq_copy)]):
        result = run_cli("seq", *args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.strip() == (f"dptrain: {seq_copy} has already finished all 3 "
                                         "epochs; nothing to do (pass a larger --epochs to "
                                         "train on)")
    assert run_files(seq_copy) == before
    with pytest.raises(Finished):
        checkpoint.config_and_resume("seq", {"resume": str(seq_copy), "config": None})
    config, _ = checkpoint.config_and_resume("seq", {"resume": str(seq_copy), "epochs": 5})
    assert config.train.epochs == 5  # more --epochs still extends it


def _reseal_metadata(folder, change) -> None:
    """Edit an fsdp checkpoint's `.metadata` (plain pickle: this test trusts its own file) and
    re-seal meta.json, as an attacker would."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    change(metadata)
    plant(folder, ".metadata", pickle.dumps(metadata))
    checkpoint.verify(folder)  # sealed, and through the allowlist


def _tensor_size(key, size):
    def change(metadata):
        item = metadata.state_dict_metadata[key]
        item.size = item.chunks[0].sizes = torch.Size(size)
        item.chunks[0].offsets = torch.Size([0] * len(size))
        item.chunks[1:] = []
    return change


def _item_length(key, length):
    def change(metadata):
        where = next(w for i, w in metadata.storage_data.items() if i.fqn == key)
        where.length = length
    return change


@pytest.mark.parametrize("change, reason", [
    (_tensor_size("optimizer.state.layers.0.weight.exp_avg", [3]),
     "damaged: optimizer.state.layers.0.weight.exp_avg is a float32 tensor of shape [3], where "
     "the run's config gives float32 [16, 784]"),
    (_tensor_size("optimizer.state.layers.1.bias.step", [2]),
     "damaged: optimizer.state.layers.1.bias.step is a float32 tensor of shape [2]"),
    (_item_length("optimizer.param_groups.0.lr", 70_000),
     "refused: optimizer.param_groups.0.lr takes 70,000 bytes, more than the 65,536"),
])
def test_dcp_metadata_that_does_not_fit_the_model_is_refused_unread(fsdp_run, tmp_path, change,
                                                                     reason):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir)
    _reseal_metadata(run_dir / "checkpoints" / "epoch-0001", change)
    before = run_files(run_dir)
    found, skipped = checkpoint.resumable(run_dir, N_TRAIN)
    assert found is None and len(skipped) == 1 and reason in skipped[0], skipped
    with pytest.raises(UserError, match=re.escape(reason)):
        checkpoint.export(run_dir, tmp_path / "model.pt")
    assert run_files(run_dir) == before and not (tmp_path / "model.pt").exists()


def _reseal_shards(folder, tmp_path, change) -> None:
    """Load an fsdp checkpoint (DCP's own loader), change its state, save it back with DCP's
    own writer, and re-seal meta.json: a consistently forged checkpoint."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dptrain.components.model import MLP
    from dptrain.components.step import make_optimizer
    from dptrain.config import build_config

    model = MLP()
    model_state, optimizer_state = get_state_dict(
        model, make_optimizer(build_config({}).optim, model.parameters(), 0.01))
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process, no process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=folder)
        change(state)
        dcp.save(state, checkpoint_id=tmp_path / "forged")
    for old in [*folder.glob("*.distcp"), folder / ".metadata"]:
        old.unlink()
    edit_meta(folder, lambda meta: meta.__setitem__("files", {}))
    for new in (tmp_path / "forged").iterdir():
        plant(folder, new.name, new.read_bytes())


@pytest.mark.parametrize("change, reason", [
    (lambda state: state["model"]["layers.1.weight"].__setitem__((2, 3), float("nan")),
     "damaged: model.layers.1.weight holds NaN or infinite values"),
    (lambda state: state["optimizer"]["param_groups"][0].__setitem__("betas", (0.5, 0.999)),
     "damaged: optimizer.param_groups.0.betas is (0.5, 0.999), the run's config gives "
     "(0.9, 0.999)"),
])
def test_dcp_shards_with_other_settings_or_nan_are_damaged(fsdp_run, tmp_path, change, reason):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir)
    _reseal_shards(run_dir / "checkpoints" / "epoch-0001", tmp_path, change)
    found, skipped = checkpoint.resumable(run_dir, N_TRAIN)
    assert found is None and len(skipped) == 1 and reason in skipped[0], skipped
    with pytest.raises(UserError, match=re.escape(reason)):
        checkpoint.export(run_dir, tmp_path / "model.pt")
