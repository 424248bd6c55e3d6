"""Adam and SGD, as torch.optim.Adam(fused=True) and SGD(fused=True) compute them, without
importing torch._dynamo, and able to skip an update on a flag that lives on the device.

torch.optim wraps Optimizer.add_param_group, zero_grad, state_dict and load_state_dict in
torch._disable_dynamo, and each step in a guard, and each imports torch._dynamo when first
called: 1.4 s and ~150 MB per process on a 2-core machine, more than a whole 25-epoch
`dptrain seq` trains. These classes call the undecorated functions (kept by functools.wraps as
__wrapped__) and the fused kernels directly, so a seq run never pays that import. (DDP's
constructor and FSDP's DTensors import it anyway.) The Adam step is also ~7x cheaper: one
kernel, no Python bookkeeping. State, state_dict and results are those of torch.optim's fused
optimizers, to the bit.

`skip_if`: a float32 scalar tensor on the parameters' device. Wherever it is non-zero the
fused kernel leaves parameters and state untouched (the `found_inf` of torch.amp's
GradScaler), so whether an update is applied is decided on the device, without the host
reading anything (step.py keeps that flag).
"""

from __future__ import annotations

import torch


def _undecorated(function):
    return getattr(function, "__wrapped__", function)


def _locals(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor: a DTensor's local shard (an alias), else the tensor."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


class _Lean:
    """The undecorated Optimizer methods (see the module docstring)."""

    # A copy (copy.deepcopy keeps only an optimizer's defaults, state and param_groups; the
    # checkpoint checks step one) never skips.
    skip_if: torch.Tensor | None = None

    add_param_group = _undecorated(torch.optim.Optimizer.add_param_group)
    zero_grad = _undecorated(torch.optim.Optimizer.zero_grad)
    state_dict = _undecorated(torch.optim.Optimizer.state_dict)
    load_state_dict = _undecorated(torch.optim.Optimizer.load_state_dict)


class FusedAdam(_Lean, torch.optim.Adam):
    """torch.optim.Adam(fused=True) with a lean step (no amsgrad, no closure, no grad scaling)."""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0,
                 skip_if: torch.Tensor | None = None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=True)
        self.skip_if = skip_if

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("FusedAdam.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            steps = [s["step"] for s in states]
            # A skipped update still counts its step here (torch.optim subtracts it again); a
            # skipped update stops the run, whose state is then never saved.
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                               lr=group["lr"], beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], eps=group["eps"],
                               maximize=False, found_inf=self.skip_if)

    def _state(self, param: torch.Tensor) -> dict:
        """The per-parameter state, created as torch.optim.Adam(fused=True) creates it."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


class FusedSGD(_Lean, torch.optim.SGD):
    """torch.optim.SGD(fused=True), momentum and weight decay included (no nesterov)."""

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 skip_if: torch.Tensor | None = None):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
        self.skip_if = skip_if

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("FusedSGD.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum = group["momentum"]
            buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
            first = bool(buffers) and all(b is None for b in buffers)
            if first:  # the kernel fills them with the first gradients
                buffers = [torch.empty_like(p.grad) for p in params]
            # The kernel has no DTensor rule (fused Adam has one): under fsdp it updates each
            # rank's shards, which is all an element-wise update needs.
            torch._fused_sgd_(_locals(params), _locals([p.grad for p in params]), _locals(buffers),
                              weight_decay=group["weight_decay"], momentum=momentum,
                              lr=group["lr"], dampening=group["dampening"], nesterov=False,
                              maximize=False, is_first_step=first, found_inf=self.skip_if)
            for param, buffer in zip(params, buffers):
                self.state[param]["momentum_buffer"] = buffer
