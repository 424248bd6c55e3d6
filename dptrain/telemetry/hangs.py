"""A hang names who stalled: heartbeats in the rendezvous store, read when a collective times out.

Each rank's Heartbeat is a daemon thread that writes the rank's place (epoch, update, phase)
into torchrun's TCPStore (MASTER_ADDR:MASTER_PORT, the store the process group met in) every
HEARTBEAT_SECONDS. It runs beside the training thread, which only sets attributes as it goes:
nothing per step touches the store or the device. A rank blocked in a collective keeps beating
(its thread runs while the main thread waits), with its place still "the gradient sum"; a rank
that is stopped (SIGSTOP, a debugger, a swapped-out node) or dead stops beating. So when a
collective times out, the rank that saw it reads every heartbeat (stall_line) and says which
rank stopped where, and where the others waited.

On nccl the watchdog, not Python, sees a timeout and ends the process, so no line is printed
there; instead PyTorch's flight recorder is armed (arm_flight_recorder): its ring buffer of
recent collectives is dumped per rank into the run folder on a timeout. Untested here (no GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from dptrain.telemetry.phases import LABELS

HEARTBEAT_SECONDS = 1.0
# How long a reader waits for the store: its host (rank 0) may be the rank that stopped.
READ_TIMEOUT_S = 3.0
# nccl's dumps: RUN/flight-recorder/rank_<R>, one per rank (torchfrtrace's layout).
FLIGHT_RECORDER = "flight-recorder"


def _key(rank: int) -> str:
    # The attempt too: torchrun may keep one store across restarts (launch.py asks it not to).
    return f"dptrain/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _client(timeout_s: float):
    """A client of the process group's TCPStore, with a timeout of its own."""
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class Heartbeat:
    """This rank's place in the store every HEARTBEAT_SECONDS, and at once when poked (a new
    epoch), from a daemon thread."""

    def __init__(self, telemetry, env):
        self.telemetry, self.env, self.key = telemetry, env, _key(env.rank)
        self._store = _client(HEARTBEAT_SECONDS * 5)
        self._wake, self._stopping = threading.Event(), False
        self._beat()
        self._thread = threading.Thread(target=self._run, name="dptrain-heartbeat", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Beat now (the training thread only wakes the heartbeat's)."""
        self._wake.set()

    def _beat(self) -> None:
        t = self.telemetry
        self._store.set(self.key, json.dumps({"epoch": t.epoch, "update": t.update_index + 1,
                                              "phase": t.current, "time": time.time()}))

    def _run(self) -> None:
        while True:
            self._wake.wait(HEARTBEAT_SECONDS)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._beat()
            except Exception:  # the store is gone (rank 0 ended): the run is ending anyway
                return

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS * 5)

    def attach(self, error: BaseException) -> None:
        """Give a failure every rank's last heartbeat (error.heartbeats), for stall_line: read
        now, while this rank's process group keeps rank 0's store up."""
        from dptrain.errors import UserError

        if not isinstance(error, UserError):  # the user's own errors name their cause
            error.heartbeats = read_heartbeats(self.env.world_size)


@contextlib.contextmanager
def _no_stderr():
    """File descriptor 2 to /dev/null for a while, for C++ that cannot be told to be quiet.

    A TCPStore client whose host is gone logs every retry with a C++ backtrace (30 lines a
    try, at any TORCH_CPP_LOG_LEVEL) before it gives up. On a failing run's path rank 0 may
    have ended first; its peers then read the store while it closes, and their retries buried
    the failure's one line. Only a failure's path reads the store, so hiding its stderr
    (Python's too, for up to READ_TIMEOUT_S) hides nothing the user needs.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read_heartbeats(world_size: int, timeout_s: float = READ_TIMEOUT_S) -> dict[int, dict | None]:
    """Every rank's last heartbeat (None where a rank wrote none); {} if the store does not
    answer within `timeout_s`."""
    try:
        with _no_stderr():  # the store's host may be closing: its reads log backtraces too
            store = _client(timeout_s)
            beats = {}
            for rank in range(world_size):
                key = _key(rank)
                beats[rank] = json.loads(store.get(key)) if store.check([key]) else None
        return beats
    except Exception:  # DistStoreError, a refused connection, a torn JSON
        return {}


def stall_line(me: int, world_size: int, timeout_s: float, beats=None,
               now: float | None = None) -> str:
    """Who stopped where and where the others waited, e.g. 'rank 1 stopped at epoch 3, update
    17 (forward/backward) 31 s ago; rank 0 waited in the gradient sum'; "" without heartbeats.

    A rank's heartbeat is stale when older than half the collective timeout (a waiting rank
    beats every second; a stopped one stopped at least a timeout ago), and never less than two
    beats. Rank `me` (the reader) is alive. The place is the stale rank's last heartbeat's.
    """
    beats = read_heartbeats(world_size) if beats is None else beats
    if not beats:
        return ""
    now = time.time() if now is None else now
    stale_after = max(2 * HEARTBEAT_SECONDS, timeout_s / 2)
    stopped, waiting = [], {}
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            stopped.append(f"rank {rank} never reported")
        elif rank != me and now - beat["time"] > stale_after:
            where = (f"at epoch {beat['epoch']}, update {beat['update']} "
                     if beat["epoch"] else "")
            stopped.append(f"rank {rank} stopped {where}({_label(beat['phase'])}) "
                           f"{now - beat['time']:.0f} s ago")
        else:
            waiting.setdefault(_label(beat["phase"]), []).append(rank)
    places = [f"{_ranks(ranks)} {'waited' if stopped else 'were' if ranks[1:] else 'was'} "
              f"in {place}" for place, ranks in waiting.items()]
    if not stopped:
        return ("every rank was still beating (" + "; ".join(places) + "): the timeout is too "
                "short for the work, or the ranks are in different collectives")
    return "; ".join(stopped + places)


def _label(phase: str) -> str:
    return LABELS.get(phase, phase)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def arm_flight_recorder(out: Path, backend: str) -> None:
    """nccl: keep a ring buffer of recent collectives and dump it on a timeout, one file per
    rank, into RUN/flight-recorder/ (make_telemetry creates it on nccl runs). Called before
    the process group is made; a user's own settings win. Not on gloo: torch reads the buffer
    size there too (and warns about the old name). Read the dumps with
    `torchfrtrace RUN/flight-recorder -p rank_`."""
    if backend != "nccl":
        return
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
                          str(Path(out).resolve() / FLIGHT_RECORDER / "rank_"))
