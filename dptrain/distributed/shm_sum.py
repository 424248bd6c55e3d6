"""Summing DDP gradients through shared memory, for ranks that share one node's CPUs.

A gloo all_reduce of this model's 13k gradients costs ~0.6 ms between two local processes
(TCP loopback, a wake-up per message): as much as a whole training step on one core. Here the
ranks sum through one shared buffer instead, in rounds of at most `round_elements` each:

1. every rank copies its piece of the gradients into its own input slot; all wait for all;
2. small pieces, or 2 ranks: every rank adds all the slots itself, in rank order. Otherwise
   (reduce-scatter + all-gather): each rank adds the slots' values of its 1/N of the piece, in
   rank order, into a shared result; all wait for all; every rank copies the whole result.

Each rank then reads about 2 pieces per round (its 1/N of every slot, then the result) instead of
N; with 2 ranks adding both slots costs as much and saves a wait. Every element is added in rank
order by one rank (or alike by all), so the sums are bit-identical on every rank. The buffer is
at most BUFFER_BYTES, however large the model and N: the rounds stream the gradients through it.

Two slot sets alternate by round, so a fast rank writing round k+1 never touches the set a slow
rank still reads for round k: it cannot start round k+2 before every rank has finished round k.
The plain loads and stores this relies on are ordered on x86-64 (total store order); other
machines use the process group's all_reduce.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

FLAG_STRIDE = 8  # one int64 flag per 64-byte cache line: no false sharing between ranks
LINE = 16  # float32 elements per cache line: slots and each rank's share start on one
SPIN_SECONDS = 200e-6  # then sleep between checks, so that oversubscribed ranks let others run
# The whole mapping (2 sets of N input slots and a result), whatever the model and N.
BUFFER_BYTES = 16 << 20
# Below this many elements a round is latency-bound: every rank adds all slots (one wait, not
# two). Measured with benchmarks/grad_sync.py (docs/STUDY.md, section 2).
ALL_READ_BELOW = 1 << 16


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


class SharedMemorySum:
    """A sum over the ranks of one node, for float32 CPU tensors of at most `numel` elements.

    Create on every rank together (it runs two process-group collectives).
    """

    def __init__(self, numel: int, rank: int, world_size: int, timeout_s: float, *,
                 round_elements: int | None = None, all_read_below: int | None = None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        if all_read_below is None:  # 2 ranks: adding both slots reads no more than sharing
            all_read_below = ALL_READ_BELOW if world_size > 2 else 1 << 62
        self.all_read_below = all_read_below
        most = BUFFER_BYTES // (4 * 2 * (world_size + 1)) // LINE * LINE
        self.round_elements = _whole_lines(min(numel, round_elements or most))
        self.rounds = self.phase = 0
        slot_floats = 2 * (world_size + 1) * self.round_elements
        self._map = _shared_map(4 * slot_floats + 8 * FLAG_STRIDE * world_size)
        slots = torch.frombuffer(self._map, dtype=torch.float32, count=slot_floats).view(
            2, world_size + 1, self.round_elements)
        self._inputs, self._results = slots[:, :world_size], slots[:, world_size]
        self._flags = np.frombuffer(self._map, dtype=np.int64, offset=4 * slot_floats)[::FLAG_STRIDE]
        self._own_views: dict[tuple[int, int], list[torch.Tensor]] = {}  # own_inputs'

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace `tensor` (float32, CPU, contiguous) by its sum over the ranks; returns it."""
        if self.world_size == 1:
            return tensor
        flat = tensor.view(-1)
        for start in range(0, flat.numel(), self.round_elements):
            self._round(flat[start:start + self.round_elements])
        return tensor

    def keeps_inputs(self, n: int) -> bool:
        """Whether this rank's input slots still hold all of an n-element sum once it is done:
        at most two rounds (the two slot sets alternate; a third overwrites the first)."""
        return -(-n // self.round_elements) <= 2

    def own_inputs(self, n: int) -> list[torch.Tensor]:
        """This rank's n elements of its last sum as they went in, in order: views of its
        input slots, which only this rank writes, and not before its next sum but one (the
        noise scale reads them after the sum, outside the wait for the peers)."""
        key = (n, self.rounds % 2)  # the views, made once: a read costs an index otherwise
        if key not in self._own_views:
            rounds = -(-n // self.round_elements)
            assert rounds <= 2, "keeps_inputs(n) is False"
            sizes = [min(self.round_elements, n - i * self.round_elements) for i in range(rounds)]
            self._own_views[key] = [self._inputs[(self.rounds - rounds + i) % 2, self.rank, :size]
                                    for i, size in enumerate(sizes)]
        return self._own_views[key]

    def _round(self, piece: torch.Tensor) -> None:
        n = piece.numel()
        inputs = self._inputs[self.rounds % 2, :, :n]
        self.rounds += 1
        inputs[self.rank].copy_(piece)
        self._arrive()
        if n < self.all_read_below:
            _add_in_rank_order(inputs, out=piece)
            return
        result = self._results[(self.rounds - 1) % 2, :n]
        lo, hi = self.share(n)
        _add_in_rank_order(inputs[:, lo:hi], out=result[lo:hi])
        self._arrive()
        piece.copy_(result)

    def share(self, n: int) -> tuple[int, int]:
        """This rank's part [lo, hi) of an n-element round: about n / N, in whole cache lines."""
        lines = -(-n // LINE)
        lo, hi = (min(n, LINE * (lines * r // self.world_size)) for r in (self.rank, self.rank + 1))
        return lo, hi

    def _arrive(self) -> None:
        """Raise this rank's flag to the next phase, then wait until every rank's is there."""
        self.phase += 1
        self._flags[self.rank] = self.phase
        start = time.perf_counter()
        while (self._flags < self.phase).any():
            waited = time.perf_counter() - start
            if waited > self.timeout_s:  # as a gloo collective would: a DistError
                late = np.flatnonzero(self._flags < self.phase).tolist()
                raise dist.DistError(f"shared-memory gradient sum timed out: rank {self.rank} "
                                     f"waited {waited:.0f} s for rank(s) {late}")
            if waited > SPIN_SECONDS:
                time.sleep(50e-6)
            else:
                os.sched_yield()


def _whole_lines(n: int) -> int:
    return max(LINE, -(-n // LINE) * LINE)


def _add_in_rank_order(slots: torch.Tensor, *, out: torch.Tensor) -> None:
    """out = slots[0] + slots[1] + ... in this order: the same bits whoever computes it."""
    torch.add(slots[0], slots[1], out=out)
    for other in slots[2:]:
        out.add_(other)


def _shared_map(size: int) -> mmap.mmap:
    """A zeroed shared mapping of `size` bytes, the same on every rank of the group.

    Rank 0 creates an anonymous memory file (memfd) and the others open it through /proc: it
    has no name, so it vanishes with the last process that maps it, even after a SIGKILL.
    Where that is not possible, a file in /dev/shm, removed once every rank has mapped it.
    """
    where, fd = [None], None
    if dist.get_rank() == 0:
        try:
            fd = os.memfd_create("dptrain-grads")
            where[0] = f"/proc/{os.getpid()}/fd/{fd}"
        except (AttributeError, OSError):
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, where[0] = tempfile.mkstemp(prefix="dptrain-grads-", dir=folder)
        os.ftruncate(fd, size)
    dist.broadcast_object_list(where, src=0)
    with open(where[0], "r+b") as f:
        mapping = mmap.mmap(f.fileno(), size)
    dist.barrier()
    if fd is not None:
        os.close(fd)
        if not where[0].startswith("/proc/"):
            Path(where[0]).unlink()
    return mapping
