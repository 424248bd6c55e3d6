"""How much memory a config's model needs, from the config alone, and whether it fits.

Checked before anything is allocated: `hidden = [100000, 100000]` in a config or a checkpoint's
meta.json is 10^10 parameters, which torch would try to allocate and initialize (40 GB) before
failing. The estimate counts float32 values (4 bytes) per rank: the parameters, their
gradients, the optimizer's state (Adam: two values per parameter, SGD with momentum: one),
and the activations of one batch (the input as floats, each layer's output and its gradient).
fsdp shards parameters, gradients and optimizer state over the ranks, but holds one layer's
full parameters and gradients at a time. The planner (issue 17) reuses `estimate_memory`.

No torch here: the CLI checks a config before it starts any worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dptrain.config import Config
from dptrain.errors import UserError

VALUE_BYTES = 4  # float32
N_INPUTS, N_CLASSES = 28 * 28, 10  # as components/model.py (which imports torch)
GB = 1e9


class OutOfMemory(UserError):
    """A model that will not fit in the memory this machine has: refused before allocating."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = (("parameters", self.parameters), ("gradients", self.gradients),
                 ("optimizer state", self.optimizer), ("activations", self.activations))
        return ", ".join(f"{name} {value / GB:,.1f}" for name, value in parts if value) + " GB"


def layer_shapes(hidden) -> list[tuple[int, int]]:
    """(inputs, outputs) of each Linear layer of the MLP."""
    sizes = [N_INPUTS, *hidden, N_CLASSES]
    return list(zip(sizes, sizes[1:]))


def parameter_count(hidden) -> int:
    """Weights and biases of the MLP with these hidden widths."""
    return sum(n_in * n_out + n_out for n_in, n_out in layer_shapes(hidden))


def estimate_memory(config: Config, *, per_rank_batch: int, shards: int = 1,
                    training: bool = True) -> MemoryEstimate:
    """Bytes one rank needs for `config`'s model: to train on `per_rank_batch` samples per
    update, its state sharded over `shards` ranks (fsdp; else 1); or, with `training=False`,
    to evaluate it (parameters and the activations of an evaluation batch only)."""
    hidden = config.model.hidden
    count = parameter_count(hidden)
    own = math.ceil(count / shards)
    if shards > 1:  # fsdp gathers one layer's full parameters (and its gradients) at a time
        own += max(n_in * n_out + n_out for n_in, n_out in layer_shapes(hidden))
    widths = [N_INPUTS, *hidden, N_CLASSES]
    evaluation = config.train.eval_batch_size * (N_INPUTS + 2 * max(widths)) * VALUE_BYTES
    if not training:
        return MemoryEstimate(count * VALUE_BYTES, 0, 0, evaluation)
    per_value = {"adam": 2}.get(config.optim.optimizer, 1 if config.optim.momentum else 0)
    train = per_rank_batch * 2 * sum(widths) * VALUE_BYTES  # each layer's output and gradient
    return MemoryEstimate(parameters=own * VALUE_BYTES, gradients=own * VALUE_BYTES,
                          optimizer=math.ceil(count / shards) * per_value * VALUE_BYTES,
                          activations=max(train, evaluation))


def training_memory(config: Config, *, mode: str, world_size: int,
                    global_batch: int) -> MemoryEstimate:
    """estimate_memory for one rank of a run of `mode` at `world_size` (whose micro-batches,
    with --accumulate K, hold a K-th of its share of the global batch)."""
    share = math.ceil(global_batch / world_size)
    return estimate_memory(config, per_rank_batch=math.ceil(share / config.train.accumulate),
                           shards=world_size if mode == "fsdp" else 1)


def require_memory(estimate: MemoryEstimate, config: Config, *, ranks: int = 1, what: str = "",
                   available: int | None = None, where: str = "this machine") -> None:
    """OutOfMemory, in one line (beginning with `what`), when `ranks` ranks of `estimate`
    exceed `available` bytes (default: what this machine has free, available_bytes());
    nothing when that is unknown."""
    available = available_bytes() if available is None else available
    need = estimate.total * ranks
    if available is None or need <= available:
        return
    per = f" per rank x {ranks} ranks" if ranks > 1 else ""
    raise OutOfMemory(
        f"{what + ': ' if what else ''}the model of hidden {list(config.model.hidden)} "
        f"({parameter_count(config.model.hidden):,} parameters) needs about "
        f"{estimate.total / GB:,.1f} GB{per} ({estimate.describe()}), but {where} has "
        f"{available / GB:,.1f} GB free; choose a smaller --hidden (or --batch-size)")


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable plus free swap (/proc/meminfo), or
    less where a cgroup v2 limit is lower; None where neither can be read (not Linux)."""
    found = []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append(sum(int(info[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree")
                         if key in info))
    except (OSError, ValueError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None
