"""The step (step.py): the NaN contract kept on the device, read once per epoch."""

import pytest
import torch

from dptrain.config import build_config, resolve
from dptrain.components.data import epoch_order, load_mnist, split_indices
from dptrain.components.model import MLP
from dptrain.components.optim import FusedAdam, FusedSGD
from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
from dptrain.distributed.strategy import DistEnv, Strategy
from dptrain.telemetry import Telemetry
from dptrain.train import NonFinite, Samples, global_batches, train_epoch

BAD = 7  # the update (0-based, within the epoch) that goes wrong


@pytest.fixture(scope="module")
def data():
    mnist = load_mnist()
    return Samples(mnist, torch.device("cpu")), split_indices(len(mnist.labels), 0)


def setup(data, optimizer, **knobs):
    samples, split = data
    config = build_config({}, {"batch_size": 2048, "optimizer": optimizer, "lr": 0.05,
                               **({"momentum": 0.9} if optimizer == "sgd" else {})})
    plan = resolve(config, mode="seq", world_size=1, n_train=len(split.train))
    strategy = Strategy(DistEnv(), torch.device("cpu"))
    torch.manual_seed(0)
    model = strategy.wrap(MLP())
    guard = NonFiniteGuard(strategy.device)
    opt = make_optimizer(config.optim, model.parameters(), plan.lr, skip_if=guard.flag)
    untimed = Telemetry(updates=plan.updates_per_epoch)
    step = make_step(strategy, model, opt, samples, guard, telemetry=untimed, **knobs)
    return step, plan, strategy, epoch_order(split.train, 0, 1)


def state_of(step):
    params = [p.detach().clone() for p in step.model.parameters()]
    moments = [v.clone() for s in step.optimizer.state.values() for k, v in s.items()
               if k != "step" and v is not None]
    return params, moments


def clean_updates(data, optimizer, count, **knobs):
    """The state after the first `count` updates of epoch 1, run without a fault."""
    step, plan, strategy, order = setup(data, optimizer, **knobs)
    samples = data[0]
    step.begin_epoch(plan.updates_per_epoch)
    batches = global_batches(samples.rows(order[:plan.samples_per_epoch]), plan.global_batch)
    for index, rows in zip(range(count), batches):
        step(index, rows, len(rows), plan.lr_at(index))
    return state_of(step)


def assert_same_state(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_non_finite_loss_is_never_applied(data, optimizer, monkeypatch):
    """An inf loss at update BAD: the epoch ends with the parameters and optimizer state of the
    BAD updates before it, and the stop names that update and this rank's loss."""
    step, plan, strategy, order = setup(data, optimizer)
    real, calls = MLP.forward, []

    def forward(self, x, targets=None):
        out = real(self, x, targets)
        calls.append(1)
        return out * float("inf") if len(calls) == BAD + 1 else out

    monkeypatch.setattr(MLP, "forward", forward)
    with pytest.raises(NonFinite) as stop:
        train_epoch(step, data[0], order, plan, strategy, 0, step.telemetry)
    assert (stop.value.step, stop.value.local_loss) == (BAD, float("inf"))
    assert len(calls) == plan.updates_per_epoch  # the epoch ran on: one read at its end
    monkeypatch.setattr(MLP, "forward", real)
    assert_same_state(state_of(step), clean_updates(data, optimizer, BAD))


def test_a_non_finite_micro_batch_at_bf16_is_never_applied(data, monkeypatch):
    """--accumulate 2 --precision bf16: an inf loss in the first micro-batch of update BAD
    poisons the gradients that the second adds to, and the check after the last backward
    skips the update; the parameters stay float32 and those of the BAD updates before it."""
    knobs = {"accumulate": 2, "precision": "bf16"}
    step, plan, strategy, order = setup(data, "adam", **knobs)
    real, calls = MLP.forward, []

    def forward(self, x, targets=None):
        out = real(self, x, targets)
        calls.append(1)
        return out * float("inf") if len(calls) == 2 * BAD + 1 else out

    monkeypatch.setattr(MLP, "forward", forward)
    with pytest.raises(NonFinite) as stop:
        train_epoch(step, data[0], order, plan, strategy, 0, step.telemetry)
    assert (stop.value.step, stop.value.local_loss) == (BAD, float("inf"))
    assert len(calls) == 2 * plan.updates_per_epoch
    monkeypatch.setattr(MLP, "forward", real)
    state = state_of(step)
    assert all(p.dtype == torch.float32 for p in state[0])
    assert_same_state(state, clean_updates(data, "adam", BAD, **knobs))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_an_overflowing_gradient_is_never_applied(data, optimizer):
    """A finite loss, but one hidden-layer gradient element inf: every gradient is checked."""
    step, plan, strategy, order = setup(data, optimizer)
    weight = step.model.layers[1].weight
    calls = []

    def overflow(grad):
        calls.append(1)
        if len(calls) == BAD + 1:
            grad = grad.clone()
            grad[3, 4] = float("inf")
        return grad

    weight.register_hook(overflow)
    with pytest.raises(NonFinite) as stop:
        train_epoch(step, data[0], order, plan, strategy, 0, step.telemetry)
    assert stop.value.step == BAD and stop.value.local_loss < float("inf")  # a finite loss
    assert_same_state(state_of(step), clean_updates(data, optimizer, BAD))


def test_guard_flag_is_sticky_until_reset():
    guard = NonFiniteGuard(torch.device("cpu"))
    good, bad = [torch.ones(3)], [torch.tensor([1.0, float("nan")])]
    flags = []
    for grads in (good, good, bad, good, good):
        guard.check(grads)
        flags.append(guard.flag.item())
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0]  # the 3 updates that the step records skipped
    guard.reset()
    guard.check(good)
    assert guard.flag.item() == 0.0


@pytest.mark.parametrize("cls", [FusedAdam, FusedSGD])
def test_optimizers_skip_on_the_flag(cls):
    flag = torch.ones(())
    param = torch.nn.Parameter(torch.randn(4))
    before = param.detach().clone()
    optimizer = cls([param], lr=0.1, skip_if=flag)
    param.grad = torch.randn(4)
    optimizer.step()
    assert torch.equal(param.detach(), before)
    flag.zero_()
    optimizer.step()
    assert not torch.equal(param.detach(), before)


def test_the_first_update_does_not_import_sympy():
    """The step's first backward must not pull in sympy (torch.fx's shape checks, ~0.3 s, a
    fifth of `dptrain seq`'s training), as loss.backward(gradient) does."""
    import subprocess
    import sys

    code = """
import sys, types, numpy as np, torch
from dptrain.components.model import MLP
from dptrain.components.step import NonFiniteGuard, make_optimizer, make_step
from dptrain.config import Config
from dptrain.distributed.strategy import DistEnv, Strategy
from dptrain.telemetry import Telemetry
from dptrain.train import Samples
rng = np.random.default_rng(0)
mnist = types.SimpleNamespace(images=rng.integers(0, 255, (256, 784), dtype=np.uint8),
                              labels=rng.integers(0, 10, 256).astype(np.uint8))
strategy = Strategy(DistEnv(), torch.device("cpu"))
model = strategy.wrap(MLP())
guard = NonFiniteGuard(strategy.device)
optimizer = make_optimizer(Config().optim, model.parameters(), 0.01, skip_if=guard.flag)
samples = Samples(mnist, strategy.device)
step = make_step(strategy, model, optimizer, samples, guard, telemetry=Telemetry(updates=1))
step.begin_epoch(1)
step(0, samples.rows(np.arange(64)), 64, 0.01)
sys.exit(3 if "sympy" in sys.modules else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "the first update imported sympy"
