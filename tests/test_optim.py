"""FusedAdam and FusedSGD: torch.optim's fused Adam and SGD to the bit, without importing
torch._dynamo."""

import subprocess
import sys

import torch

import pytest

from dptrain.components.optim import FusedAdam, FusedSGD


def assert_same_as_torch(make_ours, make_theirs, lr: float) -> None:
    """20 steps of both on the same gradients, the lr changing each step as the loop's warmup
    does: the same parameters and state, to the bit; torch's state loads into ours."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(16, 784)), torch.nn.Parameter(torch.randn(16))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = make_ours(ours), make_theirs(theirs)
    for step in range(20):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for optimizer in (a, b):
            optimizer.param_groups[0]["lr"] = lr * (step + 1) / 20
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for index, state in sb["state"].items():
        assert sa["state"][index].keys() == state.keys()
        assert all(torch.equal(sa["state"][index][k], v) for k, v in state.items())
    a.load_state_dict(sb)


def test_same_steps_and_state_as_torch_fused_adam():
    assert_same_as_torch(lambda ps: FusedAdam(ps, lr=0.01, weight_decay=0.1),
                         lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, fused=True),
                         lr=0.01)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_same_steps_and_state_as_torch_sgd(momentum, weight_decay):
    assert_same_as_torch(
        lambda ps: FusedSGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=weight_decay,
                                   fused=True),
        lr=0.1)


def test_seq_training_never_imports_dynamo():
    code = ("import sys, torch\n"
            "from dptrain.components.model import MLP, cross_entropy_sum\n"
            "from dptrain.components.optim import FusedAdam\n"
            "model = MLP()\n"
            "from dptrain.components.optim import FusedSGD\n"
            "for optimizer in (FusedAdam(model.parameters(), lr=0.01),\n"
            "                  FusedSGD(model.parameters(), lr=0.01, momentum=0.9)):\n"
            "    x = torch.randint(0, 256, (32, 784), dtype=torch.uint8)\n"
            "    cross_entropy_sum(model(x), torch.zeros(32, dtype=torch.int64)).backward()\n"
            "    optimizer.step(); optimizer.zero_grad()\n"
            "    optimizer.load_state_dict(optimizer.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
