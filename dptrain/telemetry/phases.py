"""Where an epoch's time goes on each rank: timers around the step's phases, and each
collective split into its own work and the wait for the slowest peer.

Timed phases (seconds per epoch, per rank):
  batch             the epoch's shuffled order, then each update's rows gathered (index_select)
  forward_backward  forward and backward compute, without the collectives inside them
  gather            fsdp: the parameter all-gathers, as long as the last rank to arrive took
  sum               the gradient sum (ddp's comm hook, fsdp's reduce-scatter), likewise
  wait              time in those collectives, and in the epoch's end, spent waiting for a
                    slower peer
  optimizer         the lr and cleared gradients, the NaN check, clipping, the optimizer step
  epoch_end         the epoch's loss sum (the host's one read of the device), local SGD's last
                    average: as long as the last rank to arrive took

Summing against waiting, without comparing clocks. A collective ends at about the same moment
on every rank: when the last rank has arrived and the data has moved. So the time a rank spends
in it (its exposure) is its wait for the last arrival plus the collective's own work, and the
last rank to arrive waits for nobody: per update, the smallest exposure over the ranks is the
work, and each rank's wait is its exposure less that. One all-gather of the per-update
exposures, once per epoch, gives every rank all of them. The spread of the exposures at an
update is how far apart the ranks arrived there: the straggler spread.

ddp's hook launches the sum and returns (gloo) or sums before it returns (shm): the exposure of
an update is the time inside the hook calls plus the tail from the last hook's return to the
end of backward, when DDP has waited for every bucket's sum. A bucket whose sum overlaps the
backward of the next bucket costs only what is left of it at the end: that is the time the
step loses to it. fsdp's collectives are synchronous on the CPU (the time inside them is the
exposure); on CUDA they run on side streams that FSDP overlaps itself, so there they stay in
forward_backward (see Telemetry.fsdp_comms).

Host clocks (time.perf_counter) on the CPU, where every phase's work is done when its block
ends; CUDA events on a GPU, read once per epoch (CudaClock).
"""

from __future__ import annotations

import time

import numpy as np

TIMED = ("batch", "forward_backward", "optimizer", "epoch_end")
KINDS = ("gather", "sum")  # the collectives whose exposure is recorded per update
# The order of the phases in records and figures.
PHASES = ("batch", "forward_backward", "gather", "sum", "wait", "optimizer", "epoch_end")
# The words for a phase or a place in the loop (the hang line, figures).
LABELS = {"start": "start-up", "epoch_start": "the epoch's start", "batch": "batch", "forward_backward": "forward/backward",
          "gather": "the parameter gather", "sum": "the gradient sum",
          "wait": "waiting for peers", "optimizer": "optimizer", "evaluation": "evaluation",
          "checkpoint": "checkpoint writing", "epoch_end": "the epoch's loss sum"}


class HostClock:
    """perf_counter seconds, added up as each interval ends."""

    now = staticmethod(time.perf_counter)

    def __init__(self, size: int):
        self.acc = [0.0] * size

    def add(self, index: int, start: float, end: float) -> None:
        self.acc[index] += end - start

    def totals(self) -> list[float]:
        """The seconds of each bin since the last call, which starts them again."""
        totals, self.acc = self.acc, [0.0] * len(self.acc)
        return totals


class CudaClock:
    """CUDA events recorded on the current stream; their intervals are read at the end of the
    epoch, after one synchronize (no host sync per step). Untested: no GPU was at hand."""

    def __init__(self, size: int, device):
        import torch

        self.size, self.device, self._torch = size, device, torch
        self._free: list = []
        self._pending: list[tuple[int, object, object]] = []

    def now(self):
        event = self._free.pop() if self._free else self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, index: int, start, end) -> None:
        self._pending.append((index, start, end))

    def totals(self) -> list[float]:
        self._torch.cuda.synchronize(self.device)
        acc = [0.0] * self.size
        used = {}
        for index, start, end in self._pending:
            acc[index] += start.elapsed_time(end) / 1e3  # milliseconds
            used[id(start)], used[id(end)] = start, end
        self._pending.clear()
        self._free.extend(used.values())
        return acc


class Layout:
    """Where each timed phase and each collective's per-update exposure lives in a flat vector
    of bins: [batch, forward_backward, optimizer, gather x updates, sum x updates]."""

    def __init__(self, updates: int):
        self.updates = updates
        self.size = len(TIMED) + len(KINDS) * updates

    def phase(self, name: str) -> int:
        return TIMED.index(name)

    def kind(self, kind: str) -> int:
        """The bin of the first update's exposure to collective `kind`."""
        return len(TIMED) + KINDS.index(kind) * self.updates


def split(gathered: np.ndarray, layout: Layout, kinds: set[str]) -> dict:
    """The record fields of one epoch from every rank's bins (a [world, size] array):
    phase_seconds, the fastest, mean and slowest rank per phase, and straggler_seconds, the
    largest spread of the ranks' arrival at a gradient sum (0 without one)."""
    phases = {name: gathered[:, layout.phase(name)] for name in TIMED}
    exposed_total = np.zeros(len(gathered))
    # The epoch's end is a collective too: there a rank waits for the slowest one's last update.
    epoch_end = phases["epoch_end"]
    phases["epoch_end"] = np.full(len(gathered), epoch_end.min())
    wait = epoch_end - epoch_end.min()
    straggler = 0.0
    for kind in KINDS:
        first = layout.kind(kind)
        exposed = gathered[:, first:first + layout.updates]  # [rank, update]
        work = exposed.min(axis=0)  # the last rank to arrive waited for nobody
        exposed_total += exposed.sum(axis=1)
        wait += (exposed - work).sum(axis=1)
        if kind in kinds:
            phases[kind] = np.full(len(gathered), work.sum())
        if kind == "sum" and layout.updates:
            straggler = float((exposed.max(axis=0) - work).max())
    phases["forward_backward"] = phases["forward_backward"] - exposed_total
    if kinds:
        phases["wait"] = wait
    ordered = [name for name in PHASES if name in phases]
    pick = {"fastest": np.min, "mean": np.mean, "slowest": np.max}
    return {"phase_seconds": {which: {name: round(float(f(phases[name])), 6) for name in ordered}
                              for which, f in pick.items()},
            "straggler_seconds": round(straggler, 6)}


def run_totals(records: list[dict]) -> dict:
    """summary.json's phase_seconds (sums of the epochs' fastest, mean and slowest values) and
    straggler_seconds (the largest of the epochs'); {} for records without phases."""
    timed = [r for r in records if "phase_seconds" in r]
    if not timed:
        return {}
    totals: dict[str, dict[str, float]] = {}
    for record in timed:
        for which, phases in record["phase_seconds"].items():
            for name, seconds in phases.items():
                bucket = totals.setdefault(which, {})
                bucket[name] = round(bucket.get(name, 0.0) + seconds, 6)
    return {"phase_seconds": totals,
            "straggler_seconds": max(r.get("straggler_seconds", 0.0) for r in timed)}
