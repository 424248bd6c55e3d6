"""The memory estimate of a config's model, and the refusal of what will not fit, before any
allocation: `hidden = [100000, 100000]` tried to allocate 40 GB (issue 20, item 3)."""

import pytest
import torch

from dptrain.components.memory import (MemoryEstimate, OutOfMemory, estimate_memory,
                                       parameter_count, require_memory, training_memory)
from dptrain.components.model import MLP
from dptrain.components.step import make_optimizer
from dptrain.config import build_config
from dptrain.storage.statecheck import expected_state, tensor_bytes

HUGE = [1_000_000, 1_000_000]  # 10^12 parameters: 16 TB to train with Adam


@pytest.mark.parametrize("hidden", [(16, 16), (100,), (8, 4, 2)])
def test_parameter_count_is_the_models(hidden):
    assert parameter_count(hidden) == sum(p.numel() for p in MLP(hidden).parameters())


@pytest.mark.parametrize("optim", [{"optimizer": "adam"}, {"optimizer": "sgd", "momentum": 0.9},
                                   {"optimizer": "sgd"}])
def test_the_estimate_holds_the_real_state_bytes(optim):
    """Parameters, gradients and optimizer state are what torch allocates for them (Adam's
    per-parameter step counters, 4 bytes each, aside)."""
    config = build_config({"model": {"hidden": [32, 16]}, "optim": optim})
    model = MLP(config.model.hidden)
    state = expected_state(model, make_optimizer(config.optim, model.parameters(), 0.01))
    estimate = estimate_memory(config, per_rank_batch=0)
    steps = 4 * len(state["optimizer"]["state"]) if optim["optimizer"] == "adam" else 0
    assert estimate.parameters == estimate.gradients == tensor_bytes(state["model"])
    assert estimate.optimizer + steps == tensor_bytes(state["optimizer"])


def test_fsdp_shards_the_state_but_gathers_one_layer():
    config = build_config({"model": {"hidden": [256, 256]}})
    whole = estimate_memory(config, per_rank_batch=512)
    shard = training_memory(config, mode="fsdp", world_size=4, global_batch=2048)
    largest = 784 * 256 + 256
    assert shard.parameters == -(-parameter_count((256, 256)) // 4) * 4 + largest * 4
    assert shard.optimizer * 4 == pytest.approx(whole.optimizer, abs=16)
    assert shard.activations == whole.activations  # 2048 / 4 = 512 samples per rank


def test_what_will_not_fit_is_one_line():
    config = build_config({"model": {"hidden": [64]}})
    estimate = MemoryEstimate(parameters=2_000_000_000, gradients=2_000_000_000,
                              optimizer=4_000_000_000, activations=500_000_000)
    require_memory(estimate, config, ranks=2, available=17_000_000_000)
    with pytest.raises(OutOfMemory) as e:
        require_memory(estimate, config, ranks=2, available=16_000_000_000, what="x")
    assert str(e.value) == (
        "x: the model of hidden [64] (50,890 parameters) needs about 8.5 GB per rank x 2 ranks "
        "(parameters 2.0, gradients 2.0, optimizer state 4.0, activations 0.5 GB), but this "
        "machine has 16.0 GB free; choose a smaller --hidden (or --batch-size)")


def test_a_huge_model_is_refused_at_the_cli_and_in_the_worker(tmp_path):
    from dptrain.cli import _check_memory
    from dptrain.worker import run

    config = build_config({"model": {"hidden": HUGE}, "run": {"out": str(tmp_path / "run")},
                           "system": {"device": "cpu"}, "train": {"epochs": 1}})
    for mode, rank_words in (("seq", "needs about"), ("ddp", "per rank x 2 ranks")):
        with pytest.raises(OutOfMemory, match=rank_words):
            _check_memory(mode, config)
    before = torch.get_rng_state()
    with pytest.raises(OutOfMemory, match=r"hidden \[1000000, 1000000\].*but this node has"):
        run("seq", config)  # what a torchrun worker does, after the CLI
    assert not (tmp_path / "run").exists()
    assert torch.equal(before, torch.get_rng_state())  # no model was built
