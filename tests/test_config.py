import pytest

import math

from dptrain import config as config_module
from dptrain.config import (THREAD_MIN_WORK, Config, ConfigError, SystemConfig, build_config,
                            ignored_by_mode, read_toml, resolve, resolve_lr, resolve_threads,
                            step_work, to_toml)
from dptrain.flags import config_from_flags


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_seed_studys():
    c = Config()
    assert (c.model.hidden, c.train.batch_size, c.optim.lr, c.train.epochs) == ((16, 16), 1024, 0.01, 25)
    assert (c.model.activation, c.train.loss, c.optim.optimizer) == ("relu", "cross_entropy", "adam")


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 7\nbatch_size = 512\n[optim]\nlr = 0.1\n")
    c = config_from_flags({"config": path, "epochs": 3, "lr": None, "hidden": "32,8"})
    assert c.train.epochs == 3  # flag beats file
    assert c.train.batch_size == 512  # file beats default
    assert c.optim.lr == 0.1  # an unset flag (None) leaves the file's value
    assert c.model.hidden == (32, 8)
    assert c.train.seed == 0  # default


def test_unknown_key_and_section_are_named(tmp_path):
    path = write(tmp_path, "[train]\nbach_size = 5\n[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError) as e:
        config_from_flags({"config": path})
    assert "unknown key 'train.bach_size'" in str(e.value)
    assert "unknown section [trian]" in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text, key", [
    ('[train]\nepochs = "ten"\n', "train.epochs: expected an integer"),
    ("[train]\nepochs = 0\n", "train.epochs: must be >= 1, got 0"),
    ("[optim]\nlr = -0.1\n", "optim.lr: must be > 0"),
    ("[optim]\nlr = true\n", "optim.lr: expected a number"),
    ('[model]\nactivation = "gelu"\n', "model.activation: expected one of relu, sigmoid, tanh"),
    ("[model]\nhidden = [16, 0]\n", "model.hidden"),
    ("[launch]\nnproc = 0\n", "launch.nproc: must be >= 1"),
    ("[run]\nnoise_every = 0\n", "run.noise_every: must be >= 1, got 0"),
    ('[optim]\nlr_scaling = "cube"\n', "optim.lr_scaling: expected one of none, linear, sqrt, seed"),
    ('[launch]\nrdzv_endpoint = "head"\n', "launch.rdzv_endpoint: expected HOST:PORT"),
    ("[launch]\nnnodes = 2\n", "a multi-node run needs --rdzv-endpoint"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        config_from_flags({"config": write(tmp_path, text)})


def test_a_warmup_with_no_lr_rule_is_accepted_from_a_file():
    """A no-op, but a sweep crossing rules with warmups holds it (only the flag is refused)."""
    config = build_config({"optim": {"warmup_epochs": 2}})
    plan = resolve(config, mode="seq", world_size=1, n_train=42000)
    assert plan.lr_at(0) == plan.lr_at(100) == config.optim.lr


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config({}, {"epochs": 0, "lr": 0.0, "loss": "hinge"})
    message = str(e.value)
    assert "train.epochs" in message and "optim.lr" in message and "train.loss" in message


def test_a_type_error_hides_no_other_problem_and_a_misspelt_key_gets_a_suggestion():
    """One pass names them all: the mistyped key once, the others' range and choice problems
    beside it (they used to wait until the type was fixed), and the key meant."""
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"hiden": [32], "activation": "gelu"},
                      "train": {"epochs": -3, "batch_size": "big"}})
    problems = str(e.value).split("; ")
    assert "config: unknown key 'model.hiden'" in problems
    assert "did you mean hidden?" in problems
    assert "train.batch_size: expected an integer, got 'big'" in problems
    assert any(p.startswith("model.activation: expected one of") for p in problems)
    assert "train.epochs: must be >= 1, got -3" in problems
    assert sum("batch_size" in p for p in problems) == 1
    with pytest.raises(ConfigError, match=r"'optim.momentun'; did you mean momentum\?"):
        build_config({"optim": {"momentun": 0.9}})
    with pytest.raises(ConfigError, match=r"'model.epochz'; did you mean train.epochs\?"):
        build_config({"model": {"epochz": 3}})


def test_malformed_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(write(tmp_path, "[train\nepochs = 1"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")


def test_bad_hidden_flag():
    with pytest.raises(ConfigError, match="--hidden"):
        config_from_flags({"hidden": "16,x"})


def test_toml_round_trip_ignores_the_resolved_section(tmp_path):
    c = build_config({}, {"epochs": 3, "hidden": [8, 4], "data_dir": 'a "quoted" dir'})
    path = write(tmp_path, to_toml(c, {"world_size": 2, "lr": 0.02}))
    assert build_config(read_toml(path)) == c


def test_lr_rules_with_numbers():
    c = build_config({}, {"lr": 0.01, "ref_batch_size": 1024})
    assert resolve_lr(c.optim, 42000, 8) == 0.01  # none
    linear = build_config({}, {"lr_scaling": "linear"}).optim
    assert resolve_lr(linear, 4096, 4) == pytest.approx(0.04)  # 0.01 * 4096 / 1024
    seed = build_config({}, {"lr_scaling": "seed"}).optim
    # The seed study: 8 processes, each its whole 5,250-sample shard: 0.01 * 5250 / 1024.
    assert resolve_lr(seed, 42000, 8) == pytest.approx(0.05126953125)
    assert resolve_lr(seed, 1024, 1) == pytest.approx(0.01)


def test_sqrt_rule_scales_with_the_root_of_the_global_batch_only():
    sqrt = build_config({}, {"lr_scaling": "sqrt", "lr": 0.01, "ref_batch_size": 1024}).optim
    assert resolve_lr(sqrt, 4096, 4) == pytest.approx(0.02)  # 0.01 * sqrt(4)
    assert resolve_lr(sqrt, 256, 1) == pytest.approx(0.005)  # 0.01 * sqrt(1/4)
    assert resolve_lr(sqrt, 1024, 8) == 0.01  # at the reference batch: the base lr
    # The world size does not enter: the same global batch on 1 or 8 ranks, the same lr.
    assert resolve_lr(sqrt, 42000, 1) == resolve_lr(sqrt, 42000, 8) == pytest.approx(
        0.01 * (42000 / 1024) ** 0.5)
    # Warmup ramps to the sqrt-scaled lr like to any other.
    c = build_config({}, {"lr_scaling": "sqrt", "warmup_epochs": 1, "batch_size": 4096})
    plan = resolve(c, mode="ddp", world_size=2, n_train=42000)
    assert plan.lr == pytest.approx(0.02) and plan.lr_at(0) == 0.01 and plan.lr_at(10) == plan.lr


def test_warmup_ramps_linearly_from_base_to_scaled_lr():
    c = build_config({}, {"lr_scaling": "linear", "warmup_epochs": 2, "full_batch": True})
    plan = resolve(c, mode="ddp", world_size=4, n_train=42000)
    assert plan.global_batch == 42000 and plan.updates_per_epoch == 1 and plan.warmup_steps == 2
    base, target = 0.01, 0.01 * 42000 / 1024
    assert [plan.lr_at(s) for s in range(4)] == pytest.approx(
        [base, (base + target) / 2, target, target])


def test_plan_batches_and_the_dropped_tail():
    plan = resolve(Config(), mode="seq", world_size=1, n_train=42000)
    assert (plan.updates_per_epoch, plan.samples_per_epoch) == (41, 41 * 1024)
    keep = build_config({}, {"drop_last": False})
    plan = resolve(keep, mode="ddp", world_size=3, n_train=42000)
    assert (plan.updates_per_epoch, plan.samples_per_epoch) == (42, 42000)
    assert plan.per_rank_batch == pytest.approx(1024 / 3)


def test_resolve_rejects_impossible_batches():
    with pytest.raises(ConfigError, match="exceeds the 42000 training samples"):
        resolve(build_config({}, {"batch_size": 50000}), mode="seq", world_size=1, n_train=42000)
    with pytest.raises(ConfigError, match="smaller than the world size 8"):
        resolve(build_config({}, {"batch_size": 4}), mode="ddp", world_size=8, n_train=42000)
    with pytest.raises(ConfigError, match="seq runs in one process"):
        resolve(Config(), mode="seq", world_size=2, n_train=42000)


def test_shipped_configs_load():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(configs.glob("*.toml"))
    assert {f.name for f in files} >= {"seq.toml", "ddp.toml", "fsdp.toml", "seed.toml"}
    for f in files:
        build_config(read_toml(f), source=str(f))
    seed = build_config(read_toml(configs / "seed.toml"))
    assert (seed.model.activation, seed.train.loss, seed.optim.optimizer) == ("sigmoid", "mse", "sgd")


def test_a_top_level_key_is_told_its_section(tmp_path):
    path = write(tmp_path, "epochs = 2\nsplit_seed = 1\nepochz = 3\n[train]\nseed = 1\n")
    with pytest.raises(ConfigError) as e:
        config_from_flags({"config": path})
    message = str(e.value)
    assert "'epochs' belongs in section [train]" in message
    assert "'split_seed' belongs in section [data]" in message
    assert "unknown key 'epochz' outside any section" in message
    assert "unknown section" not in message


def test_a_run_config_toml_reused_never_aims_at_the_old_run(tmp_path):
    run = tmp_path / "runs" / "orig"
    run.mkdir(parents=True)
    c = build_config({}, {"epochs": 3, "out": str(run)})
    text = to_toml(c, {"world_size": 1, "threads": 1}, reusable=True)
    (run / "config.toml").write_text(text)
    assert read_toml(run / "config.toml")["resolved"]["out"] == str(run)
    reused = config_from_flags({"config": run / "config.toml"})
    assert reused.run.out == "" and reused.train.epochs == 3  # a new folder; the rest kept
    # A run folder's config.toml written before: its out, the file's own folder, is dropped;
    # an out naming another folder is the file's choice and stays.
    (run / "config.toml").write_text(to_toml(c))
    assert config_from_flags({"config": run / "config.toml"}).run.out == ""
    other = write(tmp_path, to_toml(c))
    assert config_from_flags({"config": other}).run.out == str(run)


def _plan(hidden: tuple[int, ...], global_batch: int, world_size: int):
    c = build_config({}, {"hidden": list(hidden), "batch_size": global_batch})
    return resolve(c, mode="ddp", world_size=world_size, n_train=42000)


def test_default_threads_follow_the_work_and_the_free_cores(monkeypatch):
    monkeypatch.setattr(config_module, "cpu_cores", lambda: 8)
    monkeypatch.setattr(config_module, "free_cores", lambda: 8.0)
    auto = SystemConfig()
    # The default model at its default batch: far too small to split, whatever the cores.
    assert step_work((16, 16), 1024) < THREAD_MIN_WORK
    assert resolve_threads(auto, _plan((16, 16), 1024, 1), (16, 16), 1) == 1
    # Wide layers: twice the work a second thread needs, per rank.
    hidden = (1024, 1024)
    batch = math.ceil(2 * THREAD_MIN_WORK / step_work(hidden, 1))
    assert resolve_threads(auto, _plan(hidden, batch, 1), hidden, 1) == 8
    assert resolve_threads(auto, _plan(hidden, 2 * batch, 2), hidden, 2) == 4  # a share each
    # The same global batch over many ranks: each rank's slice is too small again.
    assert resolve_threads(auto, _plan(hidden, batch, 8), hidden, 8) == 1
    # Never more than the cores other processes leave free (unless not measured).
    monkeypatch.setattr(config_module, "free_cores", lambda: 2.9)
    assert resolve_threads(auto, _plan(hidden, batch, 1), hidden, 1) == 3
    assert resolve_threads(auto, _plan(hidden, 2 * batch, 2), hidden, 2) == 1
    assert resolve_threads(auto, _plan(hidden, 2 * batch, 2), hidden, 2, measure_load=False) == 4
    # An explicit count is obeyed, small work or not.
    assert resolve_threads(SystemConfig(threads=3), _plan((16, 16), 1024, 1), (16, 16), 1) == 3


def test_free_cores_counts_the_idle_ticks_of_this_process_cpus(monkeypatch):
    reads = iter([{0: (100, 200), 1: (50, 200)}, {0: (150, 300), 1: (60, 300)}])
    monkeypatch.setattr(config_module, "_cpu_ticks", lambda cpus: next(reads))
    monkeypatch.setattr(config_module.time, "sleep", lambda seconds: None)
    assert config_module.free_cores() == pytest.approx(0.5 + 0.1)
    monkeypatch.undo()
    assert 0 <= config_module.free_cores(0.05) <= config_module.cpu_cores() + 1e-9  # the real one


def test_settings_a_mode_would_ignore_are_refused(tmp_path):
    shm = build_config({}, {"grad_sync": "shm"})
    assert ignored_by_mode("ddp", shm) == []
    assert "fsdp always sums gradients" in ignored_by_mode("fsdp", shm)[0]
    with pytest.raises(ConfigError, match="fsdp always sums"):
        resolve(shm, mode="fsdp", world_size=2, n_train=42000)  # a worker started by torchrun
    assert "launch.rdzv_id" in ignored_by_mode("ddp", build_config({}, {"rdzv_id": "job"}))[0]
    assert ignored_by_mode("ddp", build_config({}, {"rdzv_id": "job", "rdzv_endpoint": "h:1"})) == []
    # Flags that this config would not use; a config file may hold them (every run's does).
    for flags, fragment in [({"full_batch": True, "batch_size": 512}, "--batch-size is not used"),
                            ({"checkpoint_every": 0, "keep": 3}, "--keep is not used"),
                            ({"ref_batch_size": 512}, "--ref-batch-size is not used")]:
        with pytest.raises(ConfigError, match=fragment):
            config_from_flags(flags)
    path = write(tmp_path, "[train]\nfull_batch = true\nbatch_size = 512\n")
    assert config_from_flags({"config": path}).train.full_batch


def test_values_that_overflow_or_are_not_finite_are_reported_together(tmp_path):
    """timeout = inf or 1e300 was an OverflowError in every ddp worker; weight_decay = inf and
    an lr that scales to inf were accepted (issue 20, item 9)."""
    path = write(tmp_path, "[system]\ntimeout = inf\n[optim]\nweight_decay = inf\n")
    with pytest.raises(ConfigError) as e:
        config_from_flags({"config": path, "lr": float("nan")})
    assert [p.split(":")[0] for p in str(e.value).split("; ")] == [
        "optim.lr", "optim.weight_decay", "system.timeout"]
    assert "system.timeout: must be > 0 and at most 604800 seconds (a week), got inf" in str(e.value)
    with pytest.raises(ConfigError, match="system.timeout: .* got 1e"):
        build_config({"system": {"timeout": 1e300}})
    assert build_config({"system": {"timeout": 604800}}).system.timeout == 604800.0
    huge_lr = build_config({"optim": {"lr": 1e308, "lr_scaling": "linear", "ref_batch_size": 1},
                            "train": {"batch_size": 50000}})
    with pytest.raises(ConfigError) as e:
        resolve(huge_lr, mode="seq", world_size=1, n_train=42000)
    assert "train.batch_size: 50000 exceeds" in str(e.value)  # together, in one line
    assert ("optim.lr: 1e+308 scaled by lr_scaling linear at a global batch of 50000 (ref 1) is "
            "inf; it must be finite and > 0") in str(e.value)


@pytest.mark.parametrize("text", ["a = " + "[" * 100_000 + "]" * 100_000,
                                  "[model]\nhidden = " + "[" * 9 + "16" + "]" * 9],
                         ids=["100000-deep", "9-deep"])
def test_a_deeply_nested_config_is_one_line(tmp_path, text):
    with pytest.raises(ConfigError, match="nests tables or lists more than 8 levels deep"):
        read_toml(write(tmp_path, text))


def test_a_config_that_is_a_fifo_is_refused_at_once(tmp_path):
    import os
    import threading

    os.mkfifo(tmp_path / "c.toml")
    outcome = []

    def read():
        try:
            read_toml(tmp_path / "c.toml")
        except ConfigError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome == [f"config file {tmp_path / 'c.toml'}: refused: a FIFO (named pipe), not a "
                       "regular file"]
