"""fsdp2's collectives, timed: the all-gather and reduce-scatter that FSDP2's defaults call (or
the comm chosen before, which they wrap), inside the telemetry's "gather" and "sum" places
(FSDPModule.set_custom_all_gather and set_custom_reduce_scatter take any object with these two
methods).

They do what FSDP2's DefaultAllGather and DefaultReduceScatter do (a plain buffer, then the
process group's collective); those classes are private, so they are not subclassed here. On
the CPU FSDP2 calls them synchronously, so the time inside a call is the rank's exposure to it
(phases.py). A call FSDP makes with async_op=True (a prefetch) counts only its launch; the wait
for it then stays in forward_backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 names them *_single and deprecates the older names, which 2.11 has alone.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Comm:
    """Timed around `inner` (a comm chosen before, such as the noise scale's tapped
    reduce-scatter), or around what FSDP2's default does."""

    def __init__(self, contexts: dict, inner=None):
        self.contexts = contexts  # looked up per call: the profiler's window swaps them
        self.inner = inner

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.inner is not None:
            return self.inner.allocate(size, dtype=dtype, device=device)
        return torch.empty(size, dtype=dtype, device=device)


class TimedAllGather(_Comm):
    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        with self.contexts["gather"]:
            if self.inner is not None:
                return self.inner(output_tensor, input_tensor, group, async_op)
            return _all_gather(output_tensor, input_tensor, group=group, async_op=async_op)


class TimedReduceScatter(_Comm):
    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        with self.contexts["sum"]:
            if self.inner is not None:
                return self.inner(output_tensor, input_tensor, group, op, async_op)
            return _reduce_scatter(output_tensor, input_tensor, op=op, group=group,
                                   async_op=async_op)
