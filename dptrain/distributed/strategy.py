"""seq / ddp / fsdp: how a model is prepared, how ranks agree, how a full state is gathered, and
how model and optimizer state go into a checkpoint folder and come back.

The training loop calls these few methods and never asks which mode it runs in. Gradients are
*summed* over ranks (each rank's loss is already divided by the global batch), which is what
makes ddp and fsdp compute the sequential gradient exactly, uneven batches included.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dptrain.components import noise
from dptrain.components.noise import BucketTap, GradientTap
from dptrain.config import DDPConfig, SystemConfig
from dptrain.distributed import gradsum
from dptrain.errors import UserError
from dptrain.storage.runlog import peak_rss_bytes, write_atomic

# The whole model and optimizer state of a seq or ddp checkpoint (torch.save format).
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class DistEnv:
    """The torchrun environment, read once. Global rank decides who writes; local rank the GPU."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        return cls(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env.get("WORLD_SIZE", 1)),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Set by the launcher for its own questions (launch.ask_cuda_through_nvml); torch reads it.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
# NVIDIA's containers set it: it turns float32 GEMMs into TF32 unless torch is told otherwise.
TF32_OVERRIDE_ENV = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


def cuda_available() -> bool:
    """Whether CUDA can run here, by CUDA's own answer (cudaGetDeviceCount: none where the
    driver cannot start), never NVML's, whatever the environment says: NVML may see a GPU that
    CUDA cannot use (a driver too old for the wheel's CUDA), and every mode must decide alike.
    Poisons a fork of this process: a rank's question, never the launcher's."""
    saved = os.environ.pop(NVML_CHECK_ENV, None)
    try:
        return torch.cuda.is_available()
    finally:
        if saved is not None:
            os.environ[NVML_CHECK_ENV] = saved


def resolve_device(requested: str, env: DistEnv, backend: str = "auto") -> torch.device:
    """auto = this rank's GPU when CUDA is available, else the CPU.

    nccl needs a GPU per rank. gloo can share one: with --backend gloo, local ranks beyond the
    node's GPUs take them round-robin, so multi-rank CUDA code runs on a one-GPU machine.
    """
    if requested == "cpu" or (requested == "auto" and not cuda_available()):
        return torch.device("cpu")
    if not cuda_available():
        raise UserError("--device cuda, but CUDA is not available on this machine; "
                        "use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if env.local_rank >= count and backend != "gloo":
        raise UserError(f"local rank {env.local_rank} has no GPU: this node has {count}; use "
                        f"--nproc <= {count}, --backend gloo (ranks then share GPUs), or "
                        "--device cpu")
    index = env.local_rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_backend(requested: str, device: torch.device) -> str:
    """auto = nccl for CUDA devices, gloo for the CPU."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        reason = "CUDA is not available" if not cuda_available() else "the device is cpu"
        raise UserError(f"--backend nccl needs CUDA devices, but {reason}; use --backend gloo")
    return requested


class Strategy:
    """One process, no process group: every collective is the identity."""

    mode = "seq"
    backend = "none"
    grad_sync = "none"  # how gradients are summed over ranks
    checkpoint_format = "torch"  # one state.pt, written by rank 0
    fp32_precision = "ieee"  # of float32 matmuls: as make_strategy pinned it
    noise_scale = True  # read the gradient noise scale where an update has two small batches

    def __init__(self, env: DistEnv, device: torch.device):
        self.env = env
        self.device = device

    def wrap(self, model: nn.Module, *, precision: str = "fp32", telemetry=None) -> nn.Module:
        """The model, ready to train at `precision` (the step's autocast does the rest);
        `telemetry` may time its collectives."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The MLP inside whatever `wrap` returned."""
        return model

    def make_optimizer(self, build, model: nn.Module) -> torch.optim.Optimizer:
        """The run's optimizer for `wrap`'s model: `build(params)` (step.make_optimizer, the
        fused Adam or SGD), or what a strategy wraps around it (ddp's ZeRO, local SGD)."""
        return build(model.parameters())

    def end_epoch(self, model: nn.Module) -> None:
        """An epoch's updates are done: leave one model on every rank for validation and the
        checkpoint (ddp's local SGD averages it). Every rank must call it."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        return tensor

    def all_agree(self, ok: bool) -> bool:
        """True when `ok` holds on every rank. Every rank must call it."""
        return ok

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (a CPU tensor), stacked in rank order on the CPU. Every rank
        must call it."""
        return tensor.unsqueeze(0)

    def gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order. Every rank must call it."""
        return [obj]

    def memory_report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list]:
        """Per rank: peak resident memory and the bytes of parameters, gradients and optimizer
        state this rank holds (its shard under fsdp). Every rank must call it."""
        local = {
            "peak_rss_bytes": peak_rss_bytes(),
            "param_bytes": sum(_local_bytes(p) for p in model.parameters()),
            "grad_bytes": sum(_local_bytes(p.grad) for p in model.parameters()
                              if p.grad is not None),
            "optimizer_bytes": sum(_local_bytes(v) for state in _own_state(optimizer).values()
                                   for v in state.values() if isinstance(v, torch.Tensor)),
        }
        if self.device.type == "cuda":
            local["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        ranks = self.gather_object(local)
        return {key: [r[key] for r in ranks] for key in local}

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def after_evaluation(self, model: nn.Module) -> None:
        """Forward passes without a backward are done: leave the parameters as training and
        checkpoints expect them (fsdp: sharded again)."""

    def no_gradient_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Forward and backward passes inside leave their gradients on this rank, added to those
        it holds; the next backward outside sums them all over ranks (--accumulate)."""
        return contextlib.nullcontext()

    def gradient_tap(self, model: nn.Module, micro_batches: int,
                     every: int = 1) -> GradientTap | None:
        """What reads the gradient noise scale's small batches (components/noise.py), at one
        update in `every` (GradientTap): in one process, the micro-batches of an update; None
        where an update has fewer than two."""
        if micro_batches < 2 or not self.noise_scale:
            return None
        tap = GradientTap(self.device, micro_batches, every=every)
        noise.tap_micro_batches(model, tap)
        return tap

    def local_gradients(self, model: nn.Module) -> list[torch.Tensor]:
        """The gradients this rank holds after backward (its shards under fsdp), summed over
        ranks; what the non-finite check of a step reads (step.NonFiniteGuard)."""
        return [_local(p.grad) for p in model.parameters() if p.grad is not None]

    def clip_gradients(self, model: nn.Module, max_norm: float) -> None:
        """Scale the gradients down to the L2 norm `max_norm` when their norm is larger.

        The norm is that of the whole gradient summed over ranks, as seq computes it: ddp's
        replicas each hold all of it, and fsdp's sharded DTensor gradients make torch's
        clip_grad_norm_ reduce the shards' norms over the ranks (a collective on the device).
        No host sync: the scale is clamped on the device, never compared on the host. A NaN or
        inf gradient stays non-finite (the guard has flagged it, and the update is skipped).
        """
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def parameters_finite(self, model: nn.Module) -> bool:
        """True when every parameter is finite on every rank. Every rank must call it."""
        sums = torch.stack([_local(p).sum(dtype=torch.float64) for p in model.parameters()])
        return self.all_agree(math.isfinite(sums.sum().item()))  # one read of the device

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded state on CPU, complete on rank 0. Every rank must call it."""
        return {k: v.detach().cpu().clone() for k, v in self.unwrap(model).state_dict().items()}

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Model and optimizer state into `folder` (which exists). Every rank must call it."""
        if self.env.is_main:  # every rank holds the whole, identical state
            state = {"model": self.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
            write_atomic(folder / STATE_FILE, lambda f: torch.save(state, f))

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """The state `save_state` wrote, into this rank's model and optimizer."""
        STATE_LOADERS[self.checkpoint_format](self.unwrap(model), optimizer, folder, self.device)

    def close(self, *, ok: bool = True) -> None:
        """Leave the process group: after a success, only once every rank is done with it."""


# Joining the process group (the rendezvous store, then gloo's or nccl's connections) waits at
# least this long, whatever --timeout says: ranks of a busy machine or a cluster start seconds
# apart. --timeout then bounds every collective.
SETUP_TIMEOUT_S = 300.0


class SetupFailed(Exception):
    """This rank could not join the process group: a peer did not start or cannot be reached."""


class _ProcessGroupStrategy(Strategy):
    def __init__(self, env: DistEnv, device: torch.device, backend: str, system: SystemConfig):
        super().__init__(env, device)
        self.backend = backend
        self.system = system
        # The ranks' shares are the noise scale's small batches; wrap() installs the reading.
        n = env.world_size
        self.tap = GradientTap(device, n, column=env.rank) if n > 1 else None
        if not dist.is_initialized():
            setup = max(system.timeout, SETUP_TIMEOUT_S)
            # device_id binds nccl's communicator to this rank's GPU at once; gloo has none.
            bound = device if backend == "nccl" else None
            try:
                dist.init_process_group(backend, timeout=timedelta(seconds=setup),
                                        device_id=bound)
            except dist.DistError as e:
                raise SetupFailed(f"could not join the process group within {setup:g} s: a "
                                  "rank did not start or cannot reach the others") from e
            if setup != system.timeout:
                # dist.set_timeout is recent (2026); older torch has it as _set_pg_timeout.
                set_timeout = getattr(dist, "set_timeout", None) or \
                    dist.distributed_c10d._set_pg_timeout
                set_timeout(timedelta(seconds=system.timeout))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gradient_tap(self, model: nn.Module, micro_batches: int,
                     every: int = 1) -> GradientTap | None:
        if not self.noise_scale or self.tap is None:
            return None
        self.tap.every = every  # wrap() installed its reading: this tap, whatever the stride
        return self.tap

    def gather_object(self, obj) -> list:
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)  # nccl moves CUDA tensors only
        parts = [torch.empty_like(tensor) for _ in range(self.env.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts).cpu()

    def all_agree(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self, *, ok: bool = True) -> None:
        if not dist.is_initialized():
            return
        if ok:
            # A rank that tears gloo down while its peer is still in the final gather has been
            # seen to abort ("terminate called without an active exception").
            dist.barrier()
        dist.destroy_process_group()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's own part of `tensor`: the local shard of a DTensor, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _own_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state this rank holds: ZeRO's and local SGD's wrappers keep it in the
    optimizer they wrap, `.optim` (ZeRO: this rank's shard)."""
    return getattr(optimizer, "optim", optimizer).state


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for `tensor`."""
    tensor = _local(tensor)
    return tensor.numel() * tensor.element_size()


class DDPStrategy(_ProcessGroupStrategy):
    """DistributedDataParallel: a full replica per rank, gradients summed by the hook that
    gradsum.comm_hook chooses; the knobs of [ddp] (compression, local SGD, ZeRO) included."""

    mode = "ddp"

    def __init__(self, env: DistEnv, device: torch.device, backend: str, system: SystemConfig,
                 knobs: DDPConfig = DDPConfig()):
        super().__init__(env, device, backend, system)
        self.knobs = knobs
        self.grad_sync = gradsum.resolve_grad_sync(system, knobs, env, device)
        if gradsum.needs_collective(knobs):
            # The noise scale compares the ranks' gradients with their exact sum, which
            # compression approximates and local SGD skips: no estimate rather than a wrong one.
            self.tap = None
        elif self.tap is not None:  # read from DDP's buckets (noise.BucketTap)
            n = env.world_size
            self.tap = BucketTap(device, n, column=env.rank, summed_share=1 / n)
        self.hook_state = None  # the comm hook's state (PowerSGD's, local SGD's), for checkpoints
        self.averager = None  # local SGD's PeriodicModelAverager

    def wrap(self, model: nn.Module, *, precision: str = "fp32", telemetry=None) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model.to(self.device), device_ids=device_ids,
                                      gradient_as_bucket_view=True)
        self.hook_state, hook = gradsum.comm_hook(self.grad_sync, self.knobs,
                                                  list(model.parameters()), self.env,
                                                  self.system.timeout)
        tap = self.gradient_tap(model, 1)
        if tap is not None:  # the noise scale reads each bucket before the sum
            summer = self.hook_state if self.grad_sync == "shm" else None
            hook = noise.tapped_comm_hook(hook, tap, model, summer)
        # The telemetry times the chosen hook (with the tap's read) from the outside; it never
        # replaces it.
        if telemetry is not None:
            hook = telemetry.wrap_hook(hook)
        try:
            ddp.register_comm_hook(self.hook_state, hook)
        except TypeError as e:  # torch allows bf16 sums only with NCCL >= 2.10 or XCCL in its build
            raise UserError(f"--grad-compress {self.knobs.grad_compress}: torch refuses it in "
                            f"this build ({e}); use fp16") from None
        return ddp

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def no_gradient_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync()  # DDP reads the flag in forward too: both run inside

    def make_optimizer(self, build, model: nn.Module) -> torch.optim.Optimizer:
        self._build = build  # a plain optimizer like the run's, to load ZeRO's checkpoints into
        if self.knobs.zero:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            # Each rank builds `build` (the fused optimizer, with the NaN guard's skip flag)
            # over its shard of the parameters, steps it, and broadcasts the shard. Every rank
            # holds the whole summed gradient, so every rank's guard raises the same flag and
            # every shard skips the same updates: the NaN contract holds as without ZeRO.
            return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=build)
        if self.knobs.local_sgd:
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager)
            from torch.distributed.optim import PostLocalSGDOptimizer

            self.averager = PeriodicModelAverager(period=self.knobs.local_sgd,
                                                  warmup_steps=self.knobs.local_sgd_warmup)
            return PostLocalSGDOptimizer(build(model.parameters()), self.averager)
        return build(model.parameters())

    def end_epoch(self, model: nn.Module) -> None:
        """Local SGD: average the parameters unless the epoch's last update did, so that
        validation, checkpoints and model.pt see one model, the same on every rank."""
        if self.averager is None:
            return
        done, warmup, period = self.averager.step, self.averager.warmup_steps, self.averager.period
        if done > warmup and (done - 1 - warmup) % period:
            from torch.distributed.algorithms.model_averaging.utils import average_parameters

            average_parameters(iter(model.parameters()), dist.group.WORLD)

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """state.pt in seq's format: the model and one plain optimizer state (ZeRO: consolidated
        on rank 0 from every rank's shard; local SGD: rank 0's), which export, evaluate and a
        run without the knob read like any other; and what the knobs keep beside it, KNOB_FILE
        (PowerSGD's and local SGD's state of every rank). Every rank must call it."""
        if self.knobs.zero:
            optimizer.consolidate_state_dict(to=0)  # a collective: every rank sends its shard
        knobs = self._knob_state(optimizer) if _per_rank(self.knobs) else None
        if self.env.is_main:
            plain = optimizer.optim if self.knobs.local_sgd else optimizer
            state = {"model": self.unwrap(model).state_dict(), "optimizer": plain.state_dict()}
            write_atomic(folder / STATE_FILE, lambda f: torch.save(state, f))
            if knobs is not None:
                write_atomic(folder / KNOB_FILE, lambda f: torch.save(knobs, f))
        if self.knobs.zero:
            # torch keeps the consolidated copy on rank 0 until the next consolidation: the
            # whole optimizer state, which ZeRO is there to spare. It is written; drop it.
            getattr(optimizer, "_all_state_dicts", []).clear()

    def _knob_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """KNOB_FILE's content: the update count, and each rank's hook state (PowerSGD's error
        feedback and factors) and, under local SGD, its own optimizer state (the ranks step
        apart). A collective: every rank sends its part to every rank."""
        own = {"hook": gradsum.hook_state_dict(self.hook_state)}
        if self.knobs.local_sgd:
            own["optimizer"] = optimizer.optim.state_dict()["state"]
        step = self.averager.step if self.knobs.local_sgd else self.hook_state.torch.iter
        return {"step": step, "ranks": self.gather_object(own)}

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        module = self.unwrap(model)
        if self.knobs.zero:  # checked and loaded whole into a plain optimizer; each rank keeps its shard
            plain = self._build(module.parameters())
            load_torch_state(module, plain, folder, self.device)
            optimizer.load_state_dict(plain.state_dict())
        else:
            load_torch_state(module, optimizer.optim if self.knobs.local_sgd else optimizer,
                             folder, self.device)
        if not _per_rank(self.knobs):
            return
        plain = optimizer.optim if self.knobs.local_sgd else None
        knobs = load_knob_state(folder, self.device, self.knobs, module, plain,
                                self.env.world_size)
        own = knobs["ranks"][self.env.rank]
        if self.knobs.local_sgd:
            optimizer.optim.load_state_dict({**optimizer.optim.state_dict(),
                                             "state": own["optimizer"]})
            self.averager.step = knobs["step"]
        gradsum.load_hook_state(self.hook_state, own["hook"], self.device)


# What ddp's PowerSGD and local SGD keep beside state.pt: {"step": updates done, "ranks": [each
# rank's {"hook": ..., "optimizer": ...}]}, plain tensors and numbers.
KNOB_FILE = "knobs.pt"


def _per_rank(knobs: DDPConfig) -> bool:
    """Whether ranks hold state of their own that a checkpoint must keep for each (PowerSGD's
    error feedback; local SGD's optimizer states): KNOB_FILE."""
    return bool(knobs.local_sgd) or knobs.grad_compress.startswith("powersgd")


def load_knob_state(folder: Path, device: torch.device, knobs: DDPConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, world_size: int,
                    step: int | None = None) -> dict:
    """KNOB_FILE of a ddp checkpoint whose config sets `knobs`, checked before anything uses it
    (safeload.LoadError, one line): for `world_size` ranks, after `step` updates (None: the
    count it holds, which the trial resume has checked against the manifest), for `model`'s
    parameters; under local SGD, every rank's optimizer state as `optimizer` (a plain one like
    the run's) would hold it. {} when the knobs keep nothing there."""
    from dptrain.storage.safeload import ARCHIVE_OVERHEAD, LoadError, first_line, torch_load
    from dptrain.storage.statecheck import check_state, expected_state

    if not _per_rank(knobs):
        return {}
    path = folder / KNOB_FILE
    numel = sum(p.numel() for p in model.parameters())
    # Per rank at most: PowerSGD's error, P and Q (under 3 x 4 bytes a parameter), or Adam's
    # two moments (8); and the generator's 624 words.
    state = torch_load(path, map_location=device, follow_links=False,
                       max_bytes=world_size * (12 * numel + (64 << 10)) + ARCHIVE_OVERHEAD)
    try:
        if not isinstance(state, dict) or set(state) != {"step", "ranks"}:
            raise ValueError("not a table of step and ranks")
        if step is not None and state["step"] != step:
            raise ValueError(f"it counts {state['step']!r} updates, its manifest {step}")
        step = state["step"]
        ranks = state["ranks"]
        if not isinstance(ranks, list) or len(ranks) != world_size:
            raise ValueError(f"it holds no state for each of its {world_size} ranks")
        shapes = [p.shape for p in model.parameters()]
        expected = expected_state(model, optimizer)["optimizer"]["state"] \
            if knobs.local_sgd else None
        for rank, own in enumerate(ranks):
            keys = {"hook", "optimizer"} if knobs.local_sgd else {"hook"}
            if not isinstance(own, dict) or set(own) != keys:
                raise ValueError(f"rank {rank}'s state is not a table of {', '.join(keys)}")
            try:
                gradsum.check_hook_state(own["hook"], knobs, shapes, step)
                if expected is not None:
                    check_state(own["optimizer"], expected)
            except (ValueError, LoadError) as e:
                raise ValueError(f"rank {rank}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{path}: damaged: {first_line(e)}") from None
    return state


# A Linear whose parameters reach this many bytes is its own FSDP unit, gathered just for its
# compute, so that a wide model is unsharded one big layer at a time. Smaller layers share the
# root's unit: one all-gather and one reduce-scatter per step for all of them, where a unit per
# layer costs nine collectives (three gathers in forward, three again in backward, three
# reduce-scatters). Measured on 2 gloo ranks of the 2-core VM, default model: 0.55 s per epoch
# with a unit per layer, 0.15-0.2 with the root's unit alone. Below a few MB a collective costs
# its latency, not its bytes, on gloo as on NCCL.
OWN_UNIT_BYTES = 4 << 20


def own_units(model: nn.Module) -> list[nn.Module]:
    """The layers big enough to be FSDP units of their own (OWN_UNIT_BYTES)."""
    return [layer for layer in model.layers
            if sum(p.numel() * p.element_size() for p in layer.parameters()) >= OWN_UNIT_BYTES]


class FSDPStrategy(_ProcessGroupStrategy):
    """FSDP2: parameters sharded over ranks, gathered for the compute: big layers each on their
    own, small ones together (OWN_UNIT_BYTES)."""

    mode = "fsdp"
    grad_sync = "collective"  # reduce-scatter, through the process group
    checkpoint_format = "dcp"  # torch.distributed.checkpoint: each rank writes its own shards

    def wrap(self, model: nn.Module, *, precision: str = "fp32", telemetry=None) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        # bf16: gather bf16 parameters (half the bytes) for the compute, sum gradients in float32.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        model.to(self.device)
        own = own_units(model)
        # A layer unit gathers its shards in that layer's forward, which must then run; with
        # the root's unit alone, the root gathers everything and the fused loss can run.
        model.fused = not own
        for layer in own:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        # The root keeps its parameters gathered from forward to backward (FSDP2's default for
        # the root): one all-gather per step. Evaluation has no backward to reshard them after,
        # so after_evaluation does.
        fully_shard(model, mesh=mesh, mp_policy=policy)
        # The noise tap reads each unit's gradient before its sum; the telemetry times the sum
        # (with that read) and the all-gather from the outside (telemetry/collectives.py).
        # (set_custom_reduce_scatter is recent: without it, fsdp's phases keep them inside.)
        tap = self.gradient_tap(model, 1)
        reduce_scatter = noise.tapped_reduce_scatter(tap) if tap is not None else None
        timeable = telemetry and hasattr(FSDPModule, "set_custom_reduce_scatter")
        comms = telemetry.fsdp_comms(reduce_scatter) if timeable else None
        if comms:
            reduce_scatter = comms[1]
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum, as DDP's hook above; the plain SUM op also works on gloo (no PREMUL_SUM).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
                if comms:
                    module.set_custom_all_gather(comms[0])
                if reduce_scatter is not None:
                    module.set_custom_reduce_scatter(reduce_scatter)
        return model

    @contextlib.contextmanager
    def no_gradient_sync(self, model: nn.Module):
        # No reduce-scatter: each unit keeps its unsharded gradients (in the reduce dtype) and
        # adds them into the next backward's before that one's reduce-scatter.
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def after_evaluation(self, model: nn.Module) -> None:
        model.reshard()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        # Sharded: nothing is gathered on one rank, and every rank takes part (DCP's collectives).
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        # DCP's writer copies ahead on a CUDA stream whenever CUDA is available, CPU tensors
        # too; a CPU worker forked from a launcher that asked about CUDA cannot initialize it
        # (seen on a GPU machine). No copy-ahead for the CPU: nothing there to overlap.
        copy_ahead = 0 if self.device.type == "cpu" else 10_000_000
        writer = dcp.FileSystemWriter(folder, per_thread_copy_ahead=copy_ahead)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=writer)


def load_torch_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                     device: torch.device) -> dict:
    """A seq/ddp checkpoint's state.pt into a plain model and its optimizer (weights_only);
    safeload.LoadError in one line if it is refused or is not what they would hold: every
    tensor and setting is checked against them (statecheck.py) before any kernel sees it."""
    from dptrain.storage.safeload import ARCHIVE_OVERHEAD, LoadError, torch_load
    from dptrain.storage.statecheck import check_state, expected_state, tensor_bytes

    expected = expected_state(model, optimizer)
    path = folder / STATE_FILE
    state = torch_load(path, map_location=device, follow_links=False,
                       max_bytes=tensor_bytes(expected) + ARCHIVE_OVERHEAD)
    try:
        check_state(state, expected)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def load_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                   device: torch.device) -> None:
    """An fsdp checkpoint into a model (fully_shard or plain) and its optimizer, through
    safedcp. DCP reads each rank's part by global offsets, so any world size can load any
    checkpoint; without a process group, a plain model gets all of it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from dptrain.storage.safedcp import dcp_load

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp_load(state, folder)  # checked against `state` before and after (safedcp.py)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


# checkpoint_format -> how its state is loaded (also by checkpoint.resumable, as a trial).
STATE_LOADERS = {"torch": load_torch_state, "dcp": load_dcp_state}

STRATEGIES = {"seq": Strategy, "ddp": DDPStrategy, "fsdp": FSDPStrategy}


def pin_fp32_precision() -> str:
    """Every float32 matmul and convolution in IEEE fp32, whatever the environment: TF32 keeps
    10 mantissa bits, Adam amplifies the difference, and the parity guarantee needs fp32 on
    CUDA (torch's defaults are off, but $TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 turns GEMMs to TF32).
    Returns the precision that cuBLAS now uses, as torch reads it back: "ieee" (or "tf32")."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def make_strategy(mode: str, env: DistEnv, system: SystemConfig,
                  knobs: DDPConfig = DDPConfig(), before_group=None, *,
                  noise_scale: bool = True) -> Strategy:
    """Pick the device and backend, pin fp32, join the process group (ddp/fsdp), and return the
    strategy (ddp with its knobs; config.ignored_by_mode has refused them for the others).
    `before_group(backend)` runs just before the group is made (the flight recorder's set-up);
    `noise_scale`: False leaves the gradient noise scale unread (--no-noise-scale)."""
    device = resolve_device(system.device, env, system.backend)
    precision = pin_fp32_precision()
    if mode == "seq":  # config.resolve has already required a world size of 1
        strategy = Strategy(env, device)
    else:
        backend = resolve_backend(system.backend, device)
        if before_group is not None:
            before_group(backend)
        strategy = (DDPStrategy(env, device, backend, system, knobs) if mode == "ddp"
                    else STRATEGIES[mode](env, device, backend, system))
    strategy.fp32_precision, strategy.noise_scale = precision, noise_scale
    return strategy
