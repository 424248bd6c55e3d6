"""Forged seq/ddp checkpoints and model.pt files: each test first forges the file as an attacker
would (and re-seals meta.json: sizes and SHA-256 recomputed, so that every checksum passes),
then shows the refusal in one line, with the run folder untouched.

Before these checks, a 3-element Adam `exp_avg` made `dptrain seq --resume` die with SIGSEGV
(the fused kernel wrote past it), a NaN checkpoint was exported and resumed from, and a
deflate-compressed state.pt of 4 MB took 4 GB of memory before it was refused.
"""

import io
import json
import os
import shutil
import threading
import zipfile

import pytest
import torch

from conftest import run_cli
from dptrain.components.memory import OutOfMemory
from dptrain.errors import UserError
from dptrain.storage import checkpoint
from test_cli import assert_one_line_error
from test_trust import N_TRAIN, edit_meta, plant, resume_in_process, run_files


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the session's finished 3-epoch seq run (checkpoints epoch-0002, epoch-0003)."""
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def newest(run_dir):
    return run_dir / "checkpoints" / "epoch-0003"


def forge_state(folder, change) -> None:
    """Edit state.pt of a checkpoint folder and re-seal meta.json, as an attacker would."""
    state = torch.load(folder / "state.pt", weights_only=True)
    change(state)
    plant(folder, "state.pt", saved(state))
    checkpoint.verify(folder)  # sealed: every checksum and the manifest pass


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(state):
        tree = state
        for key in keys[:-1]:
            tree = tree[key]
        tree[keys[-1]] = value(tree[keys[-1]]) if callable(value) else value
    return change


def _nan_at(index):
    return lambda t: t.index_put((torch.tensor([index]),), torch.tensor(float("nan")))


@pytest.mark.parametrize("change, reason", [
    (_set("optimizer", "state", 0, "exp_avg", torch.zeros(3)),  # the SIGSEGV of issue 20
     "optimizer.state.0.exp_avg is a float32 tensor of shape [3], where the run's config gives "
     "float32 [16, 784]"),
    (_set("optimizer", "state", 2, "step", torch.tensor([27.0, 27.0])),
     "optimizer.state.2.step is a float32 tensor of shape [2], where the run's config gives "
     "float32 []"),
    (_set("optimizer", "state", 1, "exp_avg_sq", lambda t: t.double()), "float64 tensor"),
    (_set("optimizer", "state", 4, "exp_avg", lambda t: t.to_sparse()), "not a plain tensor"),
    (_set("optimizer", "param_groups", 0, "betas", (0.5, 0.999)),
     "optimizer.param_groups.0.betas is (0.5, 0.999), the run's config gives (0.9, 0.999)"),
    (_set("optimizer", "param_groups", 0, "eps", 1.0), "param_groups.0.eps is 1.0"),
    (_set("optimizer", "param_groups", 0, "weight_decay", float("inf")), "weight_decay is inf"),
    (_set("optimizer", "param_groups", 0, "amsgrad", True), "amsgrad is True"),
    (_set("optimizer", "param_groups", 0, "params", [1, 0, 2, 3, 4, 5]), "params is [1, 0"),
    (_set("optimizer", "param_groups", 0, "lr", torch.ones(2)), "lr is a tensor"),
    (lambda state: state["optimizer"]["state"].pop(5), "optimizer.state lacks 5"),
    (_set("extra", torch.zeros(1)), "the state holds unexpected 'extra'"),
    (_set("model", "layers.0.weight", torch.zeros(32, 784)), "layers.0.weight is a float32 "
     "tensor of shape [32, 784], where the run's config gives float32 [16, 784]"),
    # Issue 20, item 8: non-finite parameters (or optimizer state) are damage too.
    (_set("model", "layers.1.bias", _nan_at(3)), "model.layers.1.bias holds NaN or infinite"),
    (_set("optimizer", "state", 3, "exp_avg_sq", lambda t: t + float("inf")),
     "optimizer.state.3.exp_avg_sq holds NaN or infinite"),
])
def test_a_forged_state_is_damaged_and_passed_over(run, change, reason):
    forge_state(newest(run), change)
    found, skipped = checkpoint.resumable(run, N_TRAIN)
    assert found.epoch == 2, skipped
    assert len(skipped) == 1 and skipped[0].startswith(f"{newest(run)}: state.pt: damaged: ")
    assert reason in skipped[0], skipped[0]


def test_a_nan_checkpoint_is_not_exported(run):
    """Issue 20, item 8: export wrote a NaN model.pt, and evaluate scored it."""
    forge_state(newest(run), _set("model", "layers.0.weight", _nan_at(5)))
    with pytest.raises(UserError, match="state.pt: damaged: model.layers.0.weight holds NaN") as e:
        checkpoint.export(newest(run), run / "exported.pt")
    assert "\n" not in str(e.value) and not (run / "exported.pt").exists()


def test_resume_of_a_forged_run_is_one_line_not_a_crash(run):
    """Every checkpoint with Adam's 3-element exp_avg: exit 2 (was SIGSEGV, 139), untouched."""
    for folder in (run / "checkpoints").iterdir():
        forge_state(folder, _set("optimizer", "state", 0, "exp_avg", torch.zeros(3)))
    before = run_files(run)
    result = run_cli("seq", "--resume", str(run), "--epochs", "4", "--device", "cpu")
    assert_one_line_error(result, "no usable checkpoint", "epoch-0003: state.pt: damaged: "
                          "optimizer.state.0.exp_avg", "epoch-0002: state.pt: damaged")
    assert run_files(run) == before


def test_the_sgd_momentum_of_a_checkpoint_must_be_the_configs():
    """Settings are compared with the run's own optimizer, whichever it is (here SGD)."""
    from dptrain.components.model import MLP
    from dptrain.components.step import make_optimizer
    from dptrain.config import build_config
    from dptrain.storage.statecheck import StateMismatch, check_state, expected_state

    optim = build_config({"optim": {"optimizer": "sgd", "momentum": 0.9}}).optim
    model = MLP()
    optimizer = make_optimizer(optim, model.parameters(), 0.1)
    expected = expected_state(model, optimizer)
    assert [list(s) for s in expected["optimizer"]["state"].values()] == [["momentum_buffer"]] * 6
    saved = json.loads(json.dumps(expected["optimizer"]["param_groups"]))
    check_state({**expected, "optimizer": {**expected["optimizer"], "param_groups": saved}},
                expected)  # a genuine one passes (a JSON round trip turns tuples into lists)
    saved[0]["momentum"] = 0.5
    with pytest.raises(StateMismatch, match="param_groups.0.momentum is 0.5, the run's config "
                                            "gives 0.9"):
        check_state({**expected, "optimizer": {**expected["optimizer"], "param_groups": saved}},
                    expected)


def saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deflated(data: bytes, pad: int) -> bytes:
    """A torch.save archive rewritten with deflate-compressed records, with `pad` zero bytes
    added to one tensor: a small file that declares `pad` more bytes."""
    state = torch.load(io.BytesIO(data), weights_only=True)
    state["pad"] = torch.zeros(pad // 4)
    plain, packed = io.BytesIO(), io.BytesIO()
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for record in src.infolist():
            dst.writestr(record.filename, src.read(record.filename))
    return packed.getvalue()


def test_a_deflate_bomb_is_refused_before_it_is_inflated(run):
    folder = newest(run)
    bomb = deflated((folder / "state.pt").read_bytes(), 16 << 20)
    declared = sum(r.file_size for r in zipfile.ZipFile(io.BytesIO(bomb)).infolist())
    assert len(bomb) < 1 << 20 and declared > 16 << 20  # ~100:1
    assert torch.load(io.BytesIO(bomb), weights_only=True)["pad"].numel() == 4 << 20  # loads
    plant(folder, "state.pt", bomb)
    found, skipped = checkpoint.resumable(run, N_TRAIN)
    assert found.epoch == 2 and "state.pt: refused: compressed records" in skipped[0]
    # Uncompressed, a file far larger than the model can need is refused unread, too.
    plant(folder, "state.pt", b"\0" * (2 << 20))
    found, skipped = checkpoint.resumable(run, N_TRAIN)
    assert "state.pt: refused: 2,097,152 bytes, more than the" in skipped[0]


def test_model_pt_must_be_the_runs_model_finite_and_small(run):
    from dptrain.inference.evaluate import load_model

    state = torch.load(run / "model.pt", weights_only=True)
    torch.save({**state, "layers.2.bias": torch.full((10,), float("nan"))}, run / "model.pt")
    with pytest.raises(UserError, match=r"model.pt: cannot load it into the model of config.toml "
                                        r"\(hidden \[16, 16\]\): layers.2.bias holds NaN"):
        load_model(run)
    (run / "model.pt").write_bytes(deflated(saved(state), 16 << 20))
    with pytest.raises(UserError, match="model.pt: refused: compressed records"):
        load_model(run)
    # A config.toml of another width: the line says which tensor and both shapes (it used to
    # end at "Error(s) in loading state_dict for MLP:").
    torch.save(state, run / "model.pt")
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("hidden = [16, 16]", "hidden = [32, 16]"))
    with pytest.raises(UserError, match=r"\(hidden \[32, 16\]\): layers.0.weight is a float32 "
                                        r"tensor of shape \[16, 784\], where the run's config "
                                        r"gives float32 \[32, 784\]$"):
        load_model(run)


def test_a_model_too_large_for_this_machine_is_refused_before_allocating(run):
    """hidden = [10^6, 10^6] in a re-sealed meta.json (or config.toml) is 10^12 parameters."""
    from dptrain.inference.evaluate import load_model

    huge = [1_000_000, 1_000_000]
    edit_meta(newest(run), lambda meta: meta["config"]["model"].__setitem__("hidden", huge))
    for attempt in (lambda: checkpoint.resumable(run, N_TRAIN),
                    lambda: checkpoint.export(run, run / "exported.pt")):
        with pytest.raises(OutOfMemory, match=r"the model of hidden \[1000000, 1000000\] "
                                              r"\([\d,]+ parameters\) needs about [\d,.]+ GB"):
            attempt()
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("hidden = [16, 16]", f"hidden = {huge}"))
    with pytest.raises(OutOfMemory, match="model.pt: the model of hidden"):
        load_model(run)


def finishes(action, seconds: float = 20):
    """Run `action` in a daemon thread; what it returned or raised, or fail if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["value"] = action()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome


@pytest.mark.parametrize("plant_meta, reason", [
    (lambda p: os.mkfifo(p), "meta.json: refused: a FIFO (named pipe), not a regular file"),
    (lambda p: os.symlink("/dev/zero", p), "meta.json: refused: a symbolic link"),
    (lambda p: p.write_bytes(b" " * (2 << 20)), "meta.json: refused: larger than the 1,097,728"),
    (lambda p: p.write_text("[" * 100_000), "meta.json is nested more than 32 levels deep"),
    (lambda p: p.write_text("[" * 40 + "]" * 40), "meta.json is nested more than 32 levels deep"),
], ids=["fifo", "dev-zero", "2MB", "100000-deep", "40-deep"])
def test_a_manifest_that_is_no_file_or_too_big_is_passed_over_at_once(run, plant_meta, reason):
    (newest(run) / "meta.json").unlink()
    plant_meta(newest(run) / "meta.json")
    outcome = finishes(lambda: checkpoint.latest(run))
    found, skipped = outcome["value"]
    assert found.epoch == 2 and len(skipped) == 1, skipped
    assert skipped[0].startswith(f"{newest(run)}: ") and reason in skipped[0], skipped


@pytest.mark.parametrize("stray", ["file", "link"])
def test_a_stray_epoch_entry_is_refused_at_the_start(run, stray):
    entry = run / "checkpoints" / "epoch-0005"
    entry.write_text("not a checkpoint") if stray == "file" else \
        entry.symlink_to(newest(run), target_is_directory=True)
    before = run_files(run)
    with pytest.raises(UserError, match=r"epoch-0005 is a (file, not a folder|symbolic link); "
                                        r"dptrain writes only folders there: remove it") as e:
        resume_in_process(run, epochs=6)
    assert "\n" not in str(e.value)
    assert run_files(run) == before
