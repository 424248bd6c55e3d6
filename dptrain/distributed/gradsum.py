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

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dptrain.config import DDPConfig, SystemConfig, cpu_cores, parse_grad_compress
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


def resolve_grad_sync(system: SystemConfig, knobs: DDPConfig, env, device: torch.device) -> str:
    """The gradient sum a run uses: shm where every rank shares this node's CPUs without
    oversubscribing them and no knob needs the process group (auto), else the collective; shm
    asked for where it cannot work is a UserError (config.ignored_by_mode has already refused
    shm with compression or local SGD)."""
    from dptrain.distributed.shm_sum import supported

    one_node = env.local_world_size == env.world_size
    possible = device.type == "cpu" and one_node and supported()
    if system.grad_sync == "shm" and not possible:
        raise UserError("--grad-sync shm needs CPU ranks that all run on one x86-64 node; "
                        "use --grad-sync collective")
    if system.grad_sync == "auto":
        fits = env.local_world_size <= cpu_cores()
        return "shm" if possible and fits and not needs_collective(knobs) else "collective"
    return system.grad_sync


def needs_collective(knobs: DDPConfig) -> bool:
    """Compression and local SGD use torch's hooks, which call the process group's all_reduce.

    Why compression is not offered over the shared-memory sum: compression buys fewer bytes on
    a link between ranks, and the shared-memory sum has none; it is itself one pass over the
    gradients in memory (write a slot, read the slots), and a cast to fp16 is another such pass
    each way, so it can only cost (docs/STUDY.md, section 5, has the numbers). PowerSGD's
    factors are all-reduced inside torch's hook, which knows only the process group.
    """
    return knobs.grad_compress != "none" or knobs.local_sgd > 0


def comm_hook(grad_sync: str, knobs: DDPConfig, params: list[torch.Tensor], env,
              timeout_s: float) -> tuple[Any, Hook]:
    """(state, hook) that sum the gradients of a model with parameters `params` over the ranks,
    as `grad_sync` (resolve_grad_sync) and the knobs say. Every rank must call it together
    (shm: the shared buffer is set up with collectives).

    torch's compression and local-SGD hooks *average* (they divide by the world size N), while
    dptrain sums; how each is turned into a sum:
    - fp16, bf16: torch's fp16/bf16_compress_wrapper around dptrain's sum hook: each rank's
      bucket is cast, summed in that type, and cast back. No division and no scaling anywhere,
      so the result is exactly the low-precision sum of the cast gradients.
    - powersgd and local SGD: torch's hook, its result multiplied by N after its future. In
      PowerSGD's warm-up (a plain all_reduce of g / N) this is exact when N is a power of two
      (a division and a multiplication by 2^k change no bits, short of subnormals), so warm-up
      updates equal the plain sum's bit for bit; other N add up to one rounding each way. The
      error feedback torch keeps is untouched (it is computed inside the hook, before the
      scaling). After local SGD's warm-up no gradient is summed: N x a rank's gradient is the
      mean gradient of its own share (exactly, when the global batch is a multiple of N).
    """
    compress, rank = parse_grad_compress(knobs.grad_compress)
    if knobs.local_sgd:
        return _local_sgd(knobs, env.world_size)
    if compress in ("fp16", "bf16"):
        return None, _cast_sum(compress)
    if compress == "powersgd":
        return _powersgd(rank, knobs, params, env.world_size)
    if grad_sync == "shm":
        from dptrain.distributed.shm_sum import SharedMemorySum

        numel = sum(p.numel() for p in params)
        return SharedMemorySum(numel, env.rank, env.world_size, timeout_s), shm_sum_hook
    return None, sum_hook


def _local_sgd(knobs: DDPConfig, world_size: int) -> tuple[Any, Hook]:
    """torch's post-local SGD hook: its warm-up sums; after it, no gradient sync (no subgroup
    sums, post_local_gradient_allreduce=False): each rank steps on its own gradients, and
    DDPStrategy.make_optimizer's averager averages the parameters."""
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState, post_localSGD_hook)

    state = PostLocalSGDState(process_group=None, subgroup=None,
                              start_localSGD_iter=knobs.local_sgd_warmup,
                              post_local_gradient_allreduce=False)
    return state, scaled(post_localSGD_hook, world_size)


def _cast_sum(dtype_name: str) -> Hook:
    """dptrain's sum, its bucket cast to fp16 or bf16 first and back after (torch's wrappers)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    wrapper = {"fp16": default_hooks.fp16_compress_wrapper,
               "bf16": default_hooks.bf16_compress_wrapper}[dtype_name]
    return wrapper(sum_hook)


def _powersgd(rank: int, knobs: DDPConfig, params: list[torch.Tensor],
              world_size: int) -> tuple[Any, Hook]:
    """torch's PowerSGD at `rank` with its recommended settings: error feedback and warm start
    on; a layer is compressed only where its factors are at most half its size
    (min_compression_rate 2)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    state = PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                          start_powerSGD_iter=knobs.powersgd_warmup, min_compression_rate=2,
                          use_error_feedback=True, warm_start=True, random_seed=0)
    return PowerSGD(state, params), scaled(powersgd_hook, world_size)


class PowerSGD:
    """torch's PowerSGDState, and which parameters, in which order, each bucket's memories (the
    error feedback, the P and Q factors: flat, one tensor per bucket) hold.

    DDP rebuilds its buckets once, after a process's first update, in the order the gradients
    became ready, which reorders the parameters within a bucket and may move them between
    buckets. torch's hook memorizes nothing before its warm-up ends (hence
    start_powerSGD_iter >= 2), but a resumed run compresses from its first update, in the
    layout before the rebuild, and must then follow the rebuild. So whenever a bucket arrives
    laid out otherwise than its memories, every bucket's memories are cut into per-parameter
    pieces (`loose`), and each bucket takes its pieces back, in its new order, before torch's
    hook runs on it. Moving values changes none, so a resumed run computes what the
    uninterrupted one does. Checkpoints keep the pieces per parameter, whatever the layout.
    """

    def __init__(self, state, params: list[torch.Tensor]):
        self.torch = state
        self.index = {p: i for i, p in enumerate(params)}  # tensors hash by identity
        self.sizes = piece_sizes([p.shape for p in params], state.matrix_approximation_rank)
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> its parameters' indices
        self.loose: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.sizes}

    def follow(self, bucket_index: int, layout: tuple[int, ...]) -> None:
        """Lay the bucket's memories out in `layout` (its parameters this update, in order)."""
        elsewhere = any(set(layout) & set(other) for b, other in self.layouts.items()
                        if b != bucket_index)
        if self.layouts.get(bucket_index, layout) != layout or elsewhere:
            self.pieces(take=True)
        self.layouts[bucket_index] = layout
        for name, memory in memories(self.torch).items():
            loose = self.loose[name]
            if bucket_index not in memory and layout and all(i in loose for i in layout):
                memory[bucket_index] = torch.cat([loose.pop(i) for i in layout])

    def pieces(self, *, take: bool = False) -> dict[str, dict[int, torch.Tensor]]:
        """Every memory cut per parameter (index -> its piece), loose ones included; `take`:
        the buckets give theirs up (they are then loose, and no bucket has a layout)."""
        cut = {name: dict(loose) for name, loose in self.loose.items()}
        for name, memory in memories(self.torch).items():
            for b, tensor in memory.items():
                layout = self.layouts[b]
                cut[name].update(zip(layout, tensor.split([self.sizes[name][i] for i in layout])))
        if take:
            self.loose = cut
            for memory in memories(self.torch).values():
                memory.clear()
            self.layouts = {}
        return cut


def powersgd_hook(state, bucket):
    """torch's powerSGD_hook, its memories laid out as this update's bucket (PowerSGD), done
    when it returns.

    torch's hook starts its P and Q all-reduces from the callbacks of the ones before, on the
    process group's threads. With two buckets or more, two ranks may then start two buckets'
    all-reduces in different orders, and gloo pairs collectives by order (seen: "Received data
    size doesn't match expected size" at hidden 256,256, two buckets). Waiting here makes each
    bucket's sum finish before DDP starts the next bucket's, in the same order on every rank;
    the backward pass waits too, which on CPU ranks gives up little overlap.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

    state.follow(bucket.index(), tuple(state.index[p] for p in bucket.parameters()))
    future = powerSGD_hook(state.torch, bucket)
    future.wait()
    return future


def memories(state) -> dict[str, dict[int, torch.Tensor]]:
    """A PowerSGDState's per-bucket memories by name."""
    return {"error": state.error_dict, "p": state.p_memory_dict, "q": state.q_memory_dict}


def piece_sizes(shapes: list[torch.Size], rank: int) -> dict[str, list[int]]:
    """Per parameter, its elements in each memory of torch's PowerSGD: all of them in the
    error; n r' in P and m r' in Q for a matrix (n, m) it compresses at rank r' = min(n, m, r),
    which it does where (n + m) r' x 2 < n m (min_compression_rate 2); 0 for the others."""
    sizes: dict[str, list[int]] = {"error": [], "p": [], "q": []}
    for shape in shapes:
        n = shape[0]
        m = math.prod(shape[1:]) if len(shape) > 1 else 1
        r = min(n, m, rank)
        compressed = (n + m) * r * 2 < n * m
        sizes["error"].append(n * m)
        sizes["p"].append(n * r if compressed else 0)
        sizes["q"].append(m * r if compressed else 0)
    return sizes


def scaled(hook: Hook, factor: float) -> Hook:
    """`hook`, its result multiplied by `factor` in place once its future completes."""
    def scaled_hook(state, bucket):
        return hook(state, bucket).then(lambda fut: fut.value().mul_(factor))

    scaled_hook.__qualname__ = f"scaled({hook.__qualname__})"  # what DDP's logger records
    return scaled_hook


# What a checkpoint keeps of a hook's state: plain tensors and numbers, never the objects
# (checkpoints are loaded with weights_only=True and checked as untrusted input).

def hook_state_dict(state) -> dict:
    """This rank's part of a hook's state: {} for the plain sums and fp16/bf16 (stateless);
    PowerSGD: its update count, its RNG and, per parameter, its pieces of the P and Q factors
    and of this rank's error feedback; post-local SGD: its update count."""
    if type(state).__name__ == "PostLocalSGDState":
        return {"iter": state.iter}
    if not isinstance(state, PowerSGD):
        return {}
    name, keys, pos, has_gauss, gauss = state.torch.rng.get_state()
    return {"iter": state.torch.iter,
            "rng": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
            **{name: {int(i): t.detach().cpu().clone() for i, t in pieces.items()}
               for name, pieces in state.pieces().items()}}


def load_hook_state(state, saved: dict, device: torch.device) -> None:
    """Put back what hook_state_dict saved (already checked by check_hook_state)."""
    if type(state).__name__ == "PostLocalSGDState":
        state.iter = saved["iter"]
    elif isinstance(state, PowerSGD):
        import numpy as np

        rng = saved["rng"]
        state.torch.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32),
                                   rng["pos"], rng["has_gauss"], rng["gauss"]))
        state.torch.iter = saved["iter"]
        for memory in memories(state.torch).values():
            memory.clear()
        state.layouts = {}  # each bucket takes its pieces at its first sum
        state.loose = {name: {i: t.to(device) for i, t in saved[name].items()}
                       for name in state.sizes}


def check_hook_state(saved: Any, knobs: DDPConfig, shapes: list[torch.Size], step: int) -> None:
    """Raise ValueError saying what is wrong unless `saved` is what hook_state_dict returns for
    these knobs, a model with parameters of `shapes`, after `step` updates."""
    compress, rank = parse_grad_compress(knobs.grad_compress)
    if not knobs.local_sgd and compress != "powersgd":
        return
    if not isinstance(saved, dict) or not _is_count(saved.get("iter")):
        raise ValueError("no update count")
    warmup = knobs.local_sgd_warmup if knobs.local_sgd else knobs.powersgd_warmup
    # torch's PostLocalSGDState stops counting at its warm-up; PowerSGDState counts on.
    expected = min(step, warmup) if knobs.local_sgd else step
    if saved["iter"] != expected:
        raise ValueError(f"its update count is {saved['iter']}, not {expected}")
    if knobs.local_sgd:
        return
    rng = saved.get("rng")
    if not (isinstance(rng, dict) and isinstance(rng.get("keys"), torch.Tensor)
            and rng["keys"].shape == (624,) and rng["keys"].dtype == torch.int64
            and bool(((rng["keys"] >= 0) & (rng["keys"] < 2 ** 32)).all())
            and _is_count(rng.get("pos")) and rng["pos"] <= 624
            and rng.get("has_gauss") in (0, 1) and isinstance(rng.get("gauss"), float)):
        raise ValueError("not PowerSGD's random generator state")
    compressing = step > knobs.powersgd_warmup  # update `warmup` is the first compressed
    for name, sizes in piece_sizes(shapes, rank).items():
        pieces = saved.get(name)
        expected = dict(enumerate(sizes)) if compressing else {}
        if not isinstance(pieces, dict) or not all(
                isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.dim() == 1
                and t.dtype == torch.float32 and t.layout == torch.strided
                for t in pieces.values()):
            raise ValueError(f"its {name} memory is not a table of float32 vectors")
        if not all(bool(torch.isfinite(t).all()) for t in pieces.values()):
            raise ValueError(f"its {name} memory holds NaN or infinite values")
        held = {i: t.numel() for i, t in pieces.items()}
        if held != expected:
            raise ValueError(f"its {name} memory holds {held} values per parameter, not "
                             f"{expected}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
