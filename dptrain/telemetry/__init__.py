"""Telemetry: where the time goes (phase timers), profiler traces, TensorBoard, and heartbeats
that name a stalled rank. One object per rank, made by `make_telemetry`; the loop and the step
call its few methods and never ask which parts are on:

    with telemetry.phase("forward_backward"): ...     # a phase of the step (or a place: evaluation)
    telemetry.begin_epoch(epoch, first_step)
    telemetry.update(index)                          # before update `index` of the epoch
    fields = telemetry.end_epoch(strategy.all_gather) # the epoch's phases, reduced over ranks
    telemetry.write(record)                          # TensorBoard scalars (rank 0)

The strategy lets it time the collectives: `wrap_hook` wraps ddp's comm hook (whichever was
chosen), `fsdp_comms` gives fsdp2 timed all-gather and reduce-scatter. A part that is off is a
no-op object, never an `if` per step. No torch at import (the CLI imports `board`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from dptrain.telemetry.phases import KINDS, TIMED, CudaClock, HostClock, Layout, split

# Places in the loop that are labelled (for the heartbeat and the profiler) but not timed here:
# evaluation and checkpoint writing have their own seconds in each record.
PLACES = ("evaluation", "checkpoint")


class _Label:
    """A place in the loop: remembered for the heartbeat, not timed."""

    __slots__ = ("owner", "name")

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __enter__(self) -> None:
        self.owner.current = self.name

    def __exit__(self, *exc) -> None:
        pass


class _Timed(_Label):
    """A timed phase: its seconds go to bin `index` of the owner's clock."""

    __slots__ = ("clock", "index", "start")

    def __init__(self, owner, name: str, index: int):
        super().__init__(owner, name)
        self.clock, self.index = owner.clock, index

    def __enter__(self) -> None:
        self.owner.current = self.name
        self.start = self.clock.now()

    def __exit__(self, *exc) -> None:
        self.clock.add(self.index, self.start, self.clock.now())


class _TimedWithTail(_Timed):
    """forward_backward: when backward returns, what DDP waited for after the last hook
    returned (a sum still running) is exposure to the sum (phases.py)."""

    __slots__ = ()

    def __exit__(self, *exc) -> None:
        end = self.clock.now()
        self.clock.add(self.index, self.start, end)
        owner = self.owner
        if owner.tail_from is not None:
            self.clock.add(owner.sum_bin + owner.update_index, owner.tail_from, end)
            owner.tail_from = None


class _Collective(_Label):
    """The time inside a collective, per update. `tail`: the collective may still run when the
    call returns (ddp's hooks): the wait that follows counts too, and it is still the place."""

    __slots__ = ("clock", "base", "tail", "start", "previous")

    def __init__(self, owner, name: str, base: int, tail: bool):
        super().__init__(owner, name)
        self.clock, self.base, self.tail = owner.clock, base, tail

    def __enter__(self) -> None:
        owner = self.owner
        self.previous, owner.current = owner.current, self.name
        self.start = self.clock.now()

    def __exit__(self, *exc) -> None:
        end = self.clock.now()
        owner = self.owner
        self.clock.add(self.base + owner.update_index, self.start, end)
        if self.tail:
            owner.tail_from = end
        else:
            owner.current = self.previous


class _Traced:
    """A phase inside the profiler's window: also a record_function span of its name."""

    __slots__ = ("inner", "name", "span")

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def __enter__(self) -> None:
        from torch.profiler import record_function

        self.span = record_function(self.name)
        self.span.__enter__()
        self.inner.__enter__()

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)
        self.span.__exit__(*exc)


class _Off:
    """A part that is off: every call does nothing."""

    def update(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def poke(self) -> None:
        pass

    def attach(self, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


OFF = _Off()


class Telemetry:
    """One rank's telemetry: phase timers on `clock` (None: the places only, for the
    heartbeat); `profile`, `board`, `heartbeat`: the parts, each OFF when not wanted
    (make_telemetry sets them)."""

    def __init__(self, *, updates: int, clock=None):
        self.clock = clock
        self.layout = Layout(updates)
        self.kinds: set[str] = set()  # the collectives the strategy let us time
        self.epoch, self.first_step, self.update_index = 0, 0, 0
        self.current = "start"  # the place in the loop, for the heartbeat
        self.tail_from = None
        self.sum_bin = self.layout.kind("sum")
        self._contexts = {name: self._context(name) for name in TIMED + PLACES + KINDS}
        self.phase = self._contexts.__getitem__  # telemetry.phase(name): a context manager
        self.profile = self.board = self.heartbeat = OFF

    def _context(self, name: str, *, tail: bool = False):
        if self.clock is None or name in PLACES:
            return _Label(self, name)
        if name in KINDS:
            return _Collective(self, name, self.layout.kind(name), tail)
        if name == "forward_backward":
            return _TimedWithTail(self, name, self.layout.phase(name))
        return _Timed(self, name, self.layout.phase(name))

    # --- what the strategy calls while it wraps the model -----------------------------------

    def wrap_hook(self, hook):
        """ddp: `hook` (the chosen comm hook), timed as the gradient sum; never replaced."""
        self.kinds.add("sum")
        self._contexts["sum"] = self._context("sum", tail=True)
        contexts = self._contexts  # looked up per call: the profiler's window swaps them

        # wraps: DDP reads the hook's name and signature (its bf16 check, its annotations).
        @functools.wraps(hook)
        def timed_hook(state, bucket):
            with contexts["sum"]:
                return hook(state, bucket)

        return timed_hook

    def fsdp_comms(self, reduce_scatter=None):
        """fsdp2: (all-gather, reduce-scatter) comms that time themselves as the parameter
        gather and the gradient sum, for set_custom_all_gather / set_custom_reduce_scatter,
        around `reduce_scatter` if one was chosen (never replacing it); None on CUDA, where
        they run on FSDP's side streams and host times say nothing."""
        if isinstance(self.clock, CudaClock):
            return None
        from dptrain.telemetry.collectives import TimedAllGather, TimedReduceScatter

        self.kinds.update(KINDS)
        return (TimedAllGather(self._contexts),
                TimedReduceScatter(self._contexts, inner=reduce_scatter))

    # --- what the loop calls --------------------------------------------------------------

    def begin_epoch(self, epoch: int, first_step: int) -> None:
        self.epoch, self.first_step, self.update_index = epoch, first_step, 0
        self.current = "epoch_start"
        self.heartbeat.poke()
        if self.clock is not None:
            self.clock.totals()  # what collectives did between epochs (fsdp's evaluation)

    def update(self, index: int) -> None:
        """Update `index` of the epoch starts."""
        self.update_index = index
        self.profile.update(self.first_step + index)

    def end_epoch(self, all_gather) -> dict:
        """The epoch's phase_seconds and straggler_seconds (phases.split), from every rank's
        timers through one `all_gather` (every rank must call it); {} when not timed."""
        if self.clock is None:
            return {}
        import torch

        mine = torch.tensor(self.clock.totals(), dtype=torch.float64)
        gathered = all_gather(mine).cpu().numpy()
        return split(gathered, self.layout, self.kinds)

    def write(self, record: dict) -> None:
        """One epoch's record into TensorBoard (rank 0)."""
        self.board.write(record)

    def traced(self, on: bool) -> None:
        """The profiler's window opens (on) or closes: phases become record_function spans."""
        for name, context in self._contexts.items():
            if on and not isinstance(context, _Traced):
                self._contexts[name] = _Traced(context, name)
            elif not on and isinstance(context, _Traced):
                self._contexts[name] = context.inner

    def close(self) -> None:
        for part in (self.profile, self.board, self.heartbeat):
            part.close()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close()
        if error is not None:
            # Read while this rank's process group, and so rank 0's store, still stands.
            self.heartbeat.attach(error)


def make_telemetry(config, plan, strategy, out: Path, config_text: str) -> Telemetry:
    """This rank's telemetry for a run: phase timers unless --no-phase-times (CUDA events on a
    GPU), the profiler's window with --profile, TensorBoard on rank 0 with --tensorboard, and a
    heartbeat in the rendezvous store when there are peers."""
    run = config.run
    clock = None
    if run.phase_times:
        size = Layout(plan.updates_per_epoch).size
        clock = (CudaClock(size, strategy.device) if strategy.device.type == "cuda"
                 else HostClock(size))
    telemetry = Telemetry(updates=plan.updates_per_epoch, clock=clock)
    try:
        if run.profile:
            from dptrain.telemetry.profile import ProfileWindow

            telemetry.profile = ProfileWindow(run.profile, Path(out), strategy, telemetry)
        if run.tensorboard and strategy.env.is_main:
            from dptrain.telemetry.board import Board

            telemetry.board = Board(Path(out) / "tensorboard", config_text)
        if strategy.env.world_size > 1:
            from dptrain.telemetry.hangs import FLIGHT_RECORDER, Heartbeat

            try:
                telemetry.heartbeat = Heartbeat(telemetry, strategy.env)
            except (RuntimeError, OSError, KeyError, ValueError):
                pass  # no store to beat in (not started by torchrun?): hangs go unnamed
            if strategy.backend == "nccl":  # where each rank's flight recorder dumps
                (Path(out) / FLIGHT_RECORDER).mkdir(parents=True, exist_ok=True)
    except BaseException:
        telemetry.close()
        raise
    return telemetry
