import pytest

from dptrain.config import (Config, ConfigError, build_config, read_toml, resolve, resolve_lr,
                            to_toml)
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
    ('[optim]\nlr_scaling = "cube"\n', "optim.lr_scaling: expected one of none, linear, sqrt, seed"),
    ('[launch]\nrdzv_endpoint = "head"\n', "launch.rdzv_endpoint: expected HOST:PORT"),
    ("[launch]\nnnodes = 2\n", "a multi-node run needs --rdzv-endpoint"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        config_from_flags({"config": write(tmp_path, text)})


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config({}, {"epochs": 0, "lr": 0.0, "loss": "hinge"})
    message = str(e.value)
    assert "train.epochs" in message and "optim.lr" in message and "train.loss" in message


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
