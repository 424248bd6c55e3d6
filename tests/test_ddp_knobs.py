"""ddp's knobs on real workers (gloo, 2 processes): ZeRO, gradient compression, local SGD; and
the combinations that cannot work, refused in one line.

One plain ddp run (2 epochs, checkpointed) is the reference. Each knob's run is checkpointed
at epoch 1; a copy of a run folder cut back to that checkpoint and resumed must end exactly
where the uninterrupted run ended (bit for bit on the CPU).
"""

import shutil

import pytest
import torch

from conftest import assert_identical_parameters, load_state, metric_values, run_cli, train
from test_cli import assert_one_line_error

from dptrain.config import ConfigError, build_config, ignored_by_mode

EPOCHS = ["--epochs", "2", "--grad-sync", "collective"]
# A compressed or local-SGD run at 2 epochs (82 updates, each knob active from update 10)
# must come within this much test accuracy of the plain run (0.911 after 2 epochs); what each
# knob does at 25 epochs is measured in docs/STUDY.md, section 5.
MARGIN = 0.03
KNOBS = {"plain": [],
         "powersgd": ["--grad-compress", "powersgd", "--powersgd-warmup", "10"],
         "local-sgd": ["--local-sgd", "4", "--local-sgd-warmup", "10"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (folder, summary) of a 2-epoch ddp run, made on first use."""
    root, made = tmp_path_factory.mktemp("knobs"), {}

    def get(name, *flags):
        if name not in made:
            made[name] = root / name, train("ddp", root / name, *EPOCHS, *(flags or KNOBS[name]))
        return made[name]

    return get


def resumed_from_epoch_1(run_dir, out, *flags):
    """`run_dir` cut back to its epoch-1 checkpoint (a copy in `out`), resumed to epoch 2."""
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoints" / "epoch-0002")
    (out / "summary.json").unlink()
    result = run_cli("ddp", "--nproc", "2", "--device", "cpu", "--resume", str(out), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def checkpoint_state(run_dir, epoch=2):
    return torch.load(run_dir / "checkpoints" / f"epoch-{epoch:04d}" / "state.pt",
                      weights_only=True)


@pytest.mark.slow
def test_zero_equals_plain_ddp_and_holds_each_optimizer_state_once(runs, tmp_path):
    """Resumed under --zero from the plain run's epoch-1 checkpoint (zero may change on
    resume): ZeRO loads the whole optimizer state, steps its shards and consolidates them into
    a checkpoint, and every number equals the plain run's, bit for bit."""
    plain, plain_summary = runs("plain")
    zero = resumed_from_epoch_1(plain, tmp_path / "zero", "--zero")
    assert_identical_parameters(load_state(plain), load_state(zero))
    assert metric_values(zero) == metric_values(plain)
    a, b = checkpoint_state(plain)["optimizer"], checkpoint_state(zero)["optimizer"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    # torch partitions whole tensors: the 784x16 weight's state on one rank, the rest on the
    # other. Each element's state is held once, by one rank.
    import json
    summary = json.loads((zero / "summary.json").read_text())
    assert summary["zero"] is True
    full = plain_summary["memory"]["optimizer_bytes"]
    assert full[0] == full[1] == 8 * 13002 + 6 * 4  # exp_avg, exp_avg_sq; a step per tensor
    shards = summary["memory"]["optimizer_bytes"]
    assert sum(shards) == full[0] and max(shards) < full[0]
    assert max(shards) == 8 * 16 * 784 + 4


@pytest.mark.slow
@pytest.mark.parametrize("knob", ["powersgd", "local-sgd"])
def test_a_knob_trains_and_resumes_exactly(runs, knob, tmp_path):
    plain, plain_summary = runs("plain")
    run_dir, summary = runs(knob)
    assert summary["test_accuracy"] == pytest.approx(plain_summary["test_accuracy"], abs=MARGIN)
    assert summary["grad_sync"] == "collective"
    difference = max((a - b).abs().max() for a, b in zip(load_state(plain).values(),
                                                         load_state(run_dir).values()))
    assert difference > 1e-3  # the knob did change the computation
    resumed = resumed_from_epoch_1(run_dir, tmp_path / knob)
    assert_identical_parameters(load_state(run_dir), load_state(resumed))
    assert metric_values(resumed) == metric_values(run_dir)
    # state.pt stays seq's format (export and evaluate read it); the knob's own state of
    # every rank is beside it
    assert set(checkpoint_state(run_dir)) == {"model", "optimizer"}
    knobs = torch.load(run_dir / "checkpoints" / "epoch-0002" / "knobs.pt", weights_only=True)
    assert knobs["step"] == 82 and len(knobs["ranks"]) == 2
    ranks = knobs["ranks"]
    if knob == "powersgd":  # the error feedback is each rank's own; the factors are shared
        hooks = [r["hook"] for r in ranks]
        assert hooks[0]["iter"] == hooks[1]["iter"] == 82
        assert not torch.equal(hooks[0]["error"][0], hooks[1]["error"][0])
        assert torch.equal(hooks[0]["q"][0], hooks[1]["q"][0])
    else:  # every rank stepped its own Adam on its own gradients
        moments = [r["optimizer"][0]["exp_avg"] for r in ranks]
        assert not torch.equal(*moments)


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["fp16", "bf16"])
def test_a_cast_sum_trains_like_fp32(runs, compress, tmp_path):
    """One epoch, against the plain run's first epoch."""
    plain, _ = runs("plain")
    summary = train("ddp", tmp_path / compress, "--epochs", "1", "--grad-compress", compress)
    assert summary["grad_sync"] == "collective" and summary["grad_compress"] == compress
    first = metric_values(plain)[0]["val_accuracy"]
    assert summary["val_accuracy"] == pytest.approx(first, abs=MARGIN)
    saved = checkpoint_state(plain, epoch=1)["model"]
    assert any(not torch.equal(saved[k], v) for k, v in load_state(tmp_path / compress).items())


@pytest.mark.slow
def test_resume_refuses_a_knob_change_and_another_world_size_under_powersgd(runs):
    from dptrain.errors import UserError
    from dptrain.storage.checkpoint import resume_config

    run_dir, _ = runs("powersgd")
    for flags, words in (({"grad_compress": "fp16"}, "grad_compress 'powersgd' -> 'fp16' would "
                                                     "change the run"),
                         ({"nproc": 3}, "error feedback) keeps state of each of its 2 ranks; "
                                        "resume it at that world size (--nproc 2)")):
        with pytest.raises(UserError) as e:
            resume_config("ddp", run_dir, {"epochs": 3, **flags})
        assert words in str(e.value) and "\n" not in str(e.value)
    assert resume_config("ddp", run_dir, {"epochs": 3, "zero": True}).ddp.zero  # may change


@pytest.mark.parametrize("flags, mode, words", [
    ({"grad_compress": "powersgd"}, "fsdp", "ddp's own knobs"),
    ({"zero": True}, "seq", "ddp's own knobs"),
    ({"local_sgd": 4}, "fsdp", "ddp's own knobs"),
    ({"grad_compress": "fp16", "grad_sync": "shm"}, "ddp", "Use --grad-sync collective"),
    ({"local_sgd": 4, "grad_sync": "shm"}, "ddp", "use --grad-sync collective"),
])
def test_a_mode_refuses_knobs_it_cannot_use(flags, mode, words):
    problems = ignored_by_mode(mode, build_config({}, flags))
    assert len(problems) == 1 and words in problems[0]
    assert ignored_by_mode("ddp", build_config({}, {**flags, "grad_sync": "auto"})) == []


@pytest.mark.parametrize("flags, words", [
    ({"local_sgd": 4, "zero": True}, "would undo the local steps"),
    ({"local_sgd": 4, "grad_compress": "bf16"}, "both are DDP's one gradient hook"),
    ({"grad_compress": "powersgd:0"}, "expected none, fp16, bf16, powersgd or powersgd:RANK"),
    ({"grad_compress": "fp16:2"}, "expected none, fp16, bf16, powersgd or powersgd:RANK"),
    ({"powersgd_warmup": 1}, "ddp.powersgd_warmup: must be >= 2 updates"),
    ({"local_sgd": -1}, "ddp.local_sgd: must be >= 0"),
])
def test_impossible_knob_values_are_refused(flags, words):
    with pytest.raises(ConfigError) as e:
        build_config({}, flags)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unused_knob_flags_are_refused():
    from dptrain.flags import config_from_flags

    for flag, words in (("powersgd_warmup", "without --grad-compress powersgd"),
                        ("local_sgd_warmup", "without --local-sgd K")):
        with pytest.raises(ConfigError, match=words):
            config_from_flags({flag: 5})


def test_the_cli_refuses_ddp_knobs_elsewhere_in_one_line():
    assert_one_line_error(run_cli("fsdp", "--grad-compress", "powersgd"),
                          "--grad-compress: one of ddp's own knobs")
    assert_one_line_error(run_cli("seq", "--zero"), "--zero: one of ddp's own knobs")


def test_grad_sync_auto_takes_the_collective_for_torchs_hooks():
    from dptrain.config import DDPConfig, SystemConfig
    from dptrain.distributed.gradsum import resolve_grad_sync
    from dptrain.distributed.shm_sum import supported
    from dptrain.distributed.strategy import DistEnv

    env, cpu = DistEnv(world_size=2, local_world_size=2), torch.device("cpu")
    auto = SystemConfig()
    if supported():
        assert resolve_grad_sync(auto, DDPConfig(), env, cpu) in ("shm", "collective")
        assert resolve_grad_sync(auto, DDPConfig(zero=True), env, cpu) in ("shm", "collective")
    for knobs in (DDPConfig(grad_compress="bf16"), DDPConfig(local_sgd=2)):
        assert resolve_grad_sync(auto, knobs, env, cpu) == "collective"


def test_powersgd_memories_follow_rebuilt_buckets():
    """DDP reorders its buckets once, after a process's first update, and may move parameters
    between them; the error feedback and the factors, laid out per bucket, follow piece by
    piece (and a checkpoint keeps them per parameter)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from dptrain.distributed.gradsum import PowerSGD, memories, piece_sizes

    params = [torch.zeros(16, 784), torch.zeros(16), torch.zeros(10, 16), torch.zeros(10)]
    state = PowerSGD(PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2),
                     params)
    sizes = piece_sizes([p.shape for p in params], 2)
    assert sizes == {"error": [12544, 16, 160, 10], "p": [32, 0, 20, 0], "q": [1568, 0, 32, 0]}
    pieces = {name: [torch.full((n,), float(i)) for i, n in enumerate(sizes[name])]
              for name in sizes}
    state.follow(0, (0, 1))
    state.follow(1, (2, 3))
    for name, memory in memories(state.torch).items():
        memory[0] = torch.cat([pieces[name][0], pieces[name][1]])
        memory[1] = torch.cat([pieces[name][2], pieces[name][3]])
    state.follow(0, (2, 0, 3))  # rebuilt: bucket 0 takes parameters of both
    state.follow(1, (1,))
    for name, memory in memories(state.torch).items():
        assert torch.equal(memory[0], torch.cat([pieces[name][i] for i in (2, 0, 3)])), name
        assert torch.equal(memory[1], pieces[name][1]), name
    saved = state.pieces()
    assert all(torch.equal(saved[name][i], pieces[name][i]) for name in sizes for i in range(4))
