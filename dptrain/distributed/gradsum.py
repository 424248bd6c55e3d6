"""How ddp sums gradients: the DDP communication hook, chosen once per run.

`comm_hook` returns the (state, hook) pair that DDPStrategy registers with
`DistributedDataParallel.register_comm_hook`. A hook is `hook(state, bucket) -> Future[Tensor]`
(torch's DDP comm-hook protocol); whatever observes or changes the sum wraps the hook, hook in
and hook out, and never replaces it:

    state, hook = gradsum.comm_hook(...)
    hook = timed(hook)               # e.g. telemetry: time the sum and the wait
    ddp.register_comm_hook(state, hook)

A wrapper's hook must name its second parameter `bucket` (DDP looks it up by that name) and
must not annotate it: DDP compares the annotation with dist.GradBucket, and a module with
postponed annotations (`from __future__ import annotations`) turns it into a string.

Gradients are *summed* over ranks, never averaged: each rank's loss is already divided by the
global batch (train.py), so the sum is the sequential gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dptrain.config import SystemConfig, cpu_cores
from dptrain.errors import UserError

Hook = Callable[[Any, Any], torch.futures.Future]


def sum_hook(_state, bucket):
    """all_reduce SUM through the process group (torch's default hook would divide by the
    world size)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def shm_sum_hook(summer, bucket):
    """The same sum through a shm_sum.SharedMemorySum (the state); done when it returns."""
    done = torch.futures.Future()
    done.set_result(summer.sum_(bucket.buffer()))
    return done


def resolve_grad_sync(system: SystemConfig, env, device: torch.device) -> str:
    """The gradient sum a run uses: shm where every rank shares this node's CPUs without
    oversubscribing them (auto), else the collective; shm asked for where it cannot work is
    a UserError."""
    from dptrain.distributed.shm_sum import supported

    one_node = env.local_world_size == env.world_size
    possible = device.type == "cpu" and one_node and supported()
    if system.grad_sync == "shm" and not possible:
        raise UserError("--grad-sync shm needs CPU ranks that all run on one x86-64 node; "
                        "use --grad-sync collective")
    if system.grad_sync == "auto":
        fits = env.local_world_size <= cpu_cores()
        return "shm" if possible and fits else "collective"
    return system.grad_sync


def comm_hook(grad_sync: str, numel: int, env, timeout_s: float) -> tuple[Any, Hook]:
    """(state, hook) that sum the gradients of a model of `numel` parameters over the ranks,
    as `grad_sync` says (resolve_grad_sync). Every rank must call it together (shm: the
    shared buffer is set up with collectives)."""
    if grad_sync == "shm":
        from dptrain.distributed.shm_sum import SharedMemorySum

        return SharedMemorySum(numel, env.rank, env.world_size, timeout_s), shm_sum_hook
    return None, sum_hook
