"""A loaded state, checked against what the run's own model and optimizer would hold, before
any of it reaches a kernel.

A checkpoint's tensors come from a file anyone may have edited and re-sealed: an Adam
`exp_avg` of 3 elements passed the trial load, and the fused kernel then wrote past its end
(SIGSEGV). So every tensor must have the shape and dtype of its counterpart (a dense, plain
tensor; `step` one element) and, where it is floating point, finite values; every other value
(Adam's betas, eps, weight_decay, SGD's momentum, ... and the `params` lists) must equal the
config's. The expected state is not a list of keys kept here: it is what the run's model and
optimizer themselves produce after one update with zero gradients, on spare copies, so state
that a new optimizer or option adds is checked the same way without changing this module.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from dptrain.storage.safeload import LoadError

# param_groups values that are the optimizer's running state, not configuration: the lr of the
# last update (checkpoint._check_optimizer compares it with the manifest).
RUNNING = ("lr",)


class StateMismatch(LoadError):
    """A state that is not what the run's model and optimizer would hold ("damaged")."""

    def __init__(self, problem: str):
        super().__init__(f"damaged: {problem}")
        self.problem = problem


def expected_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...}: the state dicts `model` and `optimizer` would save
    after an update, taken from spare copies after one update with zero gradients."""
    spare_model, spare_optimizer = copy.deepcopy((model, optimizer))
    for param in spare_model.parameters():
        param.grad = torch.zeros_like(param)
    spare_optimizer.step()
    return {"model": spare_model.state_dict(), "optimizer": spare_optimizer.state_dict()}


def tensor_bytes(tree: Any) -> int:
    """The bytes of every tensor in a nested state."""
    tensors = (t for _, t in _leaves(tree) if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in tensors)


def check_state(found: Any, expected: Any) -> None:
    """StateMismatch naming the first entry of `found` that differs from `expected` (in
    structure, a tensor's kind, shape or dtype, or a value), or holds a non-finite number."""
    problem = _difference(found, expected, "")
    if problem:
        raise StateMismatch(problem)


def check_value(found: Any, expected: Any, path: str) -> None:
    """check_state for one non-tensor value, named `path` (safedcp's flattened items)."""
    problem = _difference(found, expected, path)
    if problem:
        raise StateMismatch(problem)


def check_tensor(found: Any, expected: torch.Tensor, path: str, *, shape=None) -> None:
    """check_state for one tensor; `shape`: the expected (global) shape, if not expected's."""
    problem = _tensor(found, expected, path, shape)
    if problem:
        raise StateMismatch(problem)


def _difference(found: Any, expected: Any, path: str) -> str:
    if isinstance(expected, torch.Tensor):
        return _tensor(found, expected, path)
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return f"{path or 'the state'} is a {type(found).__name__}, not a table"
        missing = [k for k in expected if k not in found]
        extra = [k for k in found if k not in expected]
        where = path or "the state"
        if missing:
            return f"{where} lacks {', '.join(map(_show, missing[:5]))}"
        if extra:
            return f"{where} holds unexpected {', '.join(map(_show, extra[:5]))}"
        return next((p for k in expected
                     if (p := _difference(found[k], expected[k], _join(path, k)))), "")
    if isinstance(expected, (list, tuple)):  # a tuple saved may come back a list: both are
        whole = f"{path} is {_show(found)}, the run's config gives {_show(expected)}"
        if not isinstance(found, (list, tuple)) or len(found) != len(expected):
            return whole
        problem = next((p for i, (f, e) in enumerate(zip(found, expected))
                        if (p := _difference(f, e, _join(path, i)))), "")
        scalars = all(isinstance(e, (bool, int, float, str, type(None))) for e in expected)
        return whole if problem and scalars else problem  # (betas, params: say them whole)
    return _leaf(found, expected, path)


def _tensor(found: Any, expected: torch.Tensor, path: str, shape=None) -> str:
    shape = tuple(expected.shape) if shape is None else tuple(shape)
    if not isinstance(found, torch.Tensor) or found.layout != torch.strided \
            or type(found) is not type(expected):
        return f"{path} is {_show(found)}, not a plain tensor like the run's"
    if tuple(found.shape) != shape or found.dtype != expected.dtype:
        return (f"{path} is a {str(found.dtype).removeprefix('torch.')} tensor of shape "
                f"{list(found.shape)}, where the run's config gives "
                f"{str(expected.dtype).removeprefix('torch.')} {list(shape)}")
    local = found.to_local() if hasattr(found, "to_local") else found
    if local.is_floating_point() and not bool(torch.isfinite(local).all()):
        return f"{path} holds NaN or infinite values"
    return ""


def _leaf(found: Any, expected: Any, path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    if name in RUNNING and _number(expected):
        ok = _number(found) and math.isfinite(found) and found >= 0
        return "" if ok else f"{path} is {_show(found)}, not a finite number >= 0"
    same_kind = (_number(found) and _number(expected)) or type(found) is type(expected)
    if not same_kind or found != expected:
        return f"{path} is {_show(found)}, the run's config gives {_show(expected)}"
    return ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    """A value in a few words (never the repr of a deep or long structure)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    plain = (bool, int, float, str, type(None))
    if isinstance(value, plain) or (isinstance(value, (list, tuple)) and len(value) <= 8
                                    and all(isinstance(v, plain) for v in value)):
        text = repr(value)
        if len(text) <= 80:
            return text
    return f"a {type(value).__name__}"


def _leaves(tree: Any, path: str = ""):
    """(path, value) of every leaf of a nested state."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, _join(path, key))
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        for index, value in enumerate(tree):
            yield from _leaves(value, _join(path, index))
    else:
        yield path, tree
