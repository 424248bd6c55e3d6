"""One rank of a run: the entry point torchrun starts, and what `dptrain seq` runs in-process.

From a cluster shell script:  torchrun [rendezvous flags] -m dptrain.worker --mode ddp [flags]
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from dptrain.storage import checkpoint
from dptrain.config import MODES, Config, Plan, cpu_cores, resolve, resolve_threads, to_toml
from dptrain.errors import ONE_LINE_EXIT, USER_ERROR_EXIT, UserError
from dptrain.flags import (Command, ddp_flags, fill_optional_values, process_group_flags,
                           training_flags, with_flags)
from dptrain.storage.runlog import (RunLock, RunLog, StorageError, check_out_dir,
                                    command_start_time, default_out_dir, err, stopped_message,
                                    write_atomic)

# Set by the CLI: it reports a worker's user error itself, from torchelastic's error file.
LAUNCHED_ENV = "DPTRAIN_LAUNCHED"
# Set by the CLI when torchrun forks the workers from it (CPU runs).
FORKED_ENV = "DPTRAIN_FORKED"
LOST_PEER = "lost a peer"
# Set by the CLI: the intra-op threads it chose for every worker of the run.
THREADS_ENV = "DPTRAIN_THREADS"


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Every step allocates and frees a few MB (the widened batch, 3.2 MB, and what is computed
    from it). By default glibc may serve such a block with a fresh mmap, or trim it off the top
    of the heap when freed, and the next use then page-faults it in again. Measured on the
    2-core VM: a `dptrain seq` run took 133k to 169k page faults, 94k with this (a bare
    `import torch` takes 87k), and wall time fell by ~0.1 s; a loop of only the gather, widen
    and products of an epoch, which faulted ~300 times a step, went from 44-52 ms to 31.
    Returns False where the C library is not glibc (nothing is changed there).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 128 << 20))


def run(mode: str, config: Config, *, force: bool = False, resume: str = "",
        restarts: int = 0) -> dict:
    """Train as this process's rank, continuing run folder `resume` if given; returns the
    summary (complete on rank 0)."""
    import torch

    from dptrain.components.data import load_mnist, recorded_location, split_indices
    from dptrain.distributed.agreement import agree_on_start, run_identity
    from dptrain.distributed.strategy import TF32_OVERRIDE_ENV, DistEnv, make_strategy
    from dptrain.telemetry import make_telemetry
    from dptrain.telemetry.hangs import arm_flight_recorder
    from dptrain.train import train

    env = DistEnv.from_environ()
    keep_freed_memory()
    # config.toml records where the data is, as an absolute path (the CLI has found it already).
    config = replace(config, data=replace(config.data, data_dir=recorded_location(
        config.data.data_dir)[0]))
    mnist = load_mnist(config.data.data_dir)
    split = split_indices(len(mnist.labels), config.data.split_seed)
    plan = resolve(config, mode=mode, world_size=env.world_size, n_train=len(split.train))
    threads = rank_threads(config, plan, env.local_world_size)
    torch.set_num_threads(threads)
    out = Path(config.run.out) if config.run.out else default_out_dir(mode)

    # The checkpoint is fully checked (a trial load included) before anything in the run
    # folder is deleted or rewritten: a damaged one is passed over, never half-obeyed.
    found, skipped = checkpoint.resumable(Path(resume), len(split.train)) if resume else (None, [])
    if resume:
        _check_resumable(found, skipped, resume, plan, env.world_size)
        stray = checkpoint.stray_entries(Path(resume))
        if stray:  # it would fail that epoch's checkpoint, on every resume: say so now
            raise checkpoint.CheckpointError(f"--resume {resume}: {'; '.join(stray)}; dptrain "
                                             "writes only folders there: remove it")

    strategy = make_strategy(mode, env, config.system, config.ddp,
                             before_group=functools.partial(arm_flight_recorder, out),
                             noise_scale=config.run.noise_scale)
    lock = RunLock(out)  # rank 0's, taken before anything is written
    ok = False
    try:
        agree_on_start(strategy, run_identity(mode, config, plan, found.epoch if found else 0))
        _check_memory_together(strategy, config, plan)
        _check_out_dir_together(strategy, out, force or found is not None, lock)
        log = RunLog(out, active=env.is_main)
        setting = {"mode": mode, "world_size": env.world_size, "backend": strategy.backend,
                   "grad_sync": strategy.grad_sync, "device": str(strategy.device),
                   "threads": threads}
        oversubscribed = (strategy.device.type == "cpu"
                          and threads * env.local_world_size > cpu_cores())
        _announce(log, config, plan, setting, out, warning=(
            f"{env.local_world_size} process(es) on this node x {threads} thread(s) exceed its "
            f"{cpu_cores()} CPU cores; expect slowdowns") if oversubscribed else "",
            records=found.records if found else [])
        if found:
            _announce_resume(log, found, skipped, config, restarts)
        if os.environ.get(TF32_OVERRIDE_ENV):
            log.note(f"[yellow]warning:[/] {TF32_OVERRIDE_ENV} is set; float32 matmuls stay "
                     f"{strategy.fp32_precision} (TF32 off unless that says tf32), as parity needs")
        resolved = to_toml(config, {**setting, **_plan_fields(plan)}, reusable=True)
        try:
            with make_telemetry(config, plan, strategy, out, config_text=resolved) as telemetry:
                results = train(config, plan, strategy, mnist, split, log, telemetry,
                                resume=found)
        except UserError as e:  # diverged, say: a restart would only repeat it
            log.stopped(str(e))
            raise
        finally:
            log.close()
        state_dict = results.pop("state_dict")
        summary = {**setting, **_plan_fields(plan), "epochs": config.train.epochs,
                   "accumulate": config.train.accumulate, "precision": config.train.precision,
                   **asdict(config.ddp), **results,
                   "resumed_from_epoch": found.epoch if found else 0, "restarts": restarts,
                   "wall_seconds": time.time() - command_start_time(),
                   "fp32_precision": strategy.fp32_precision,
                   "torch": torch.__version__, "host": socket.gethostname(),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        log.finish(summary, state_dict)
        ok = True
        return summary
    except StorageError as e:
        if not e.full:
            raise
        raise StorageError(f"{e}; {_resume_hint(out)}", full=True) from None  # what is left
    finally:
        strategy.close(ok=ok)
        lock.release()


def rank_threads(config: Config, plan: Plan, local_world_size: int) -> int:
    """This rank's intra-op threads: the launcher's choice for the workers it starts (one look
    at the node's free cores for all of them); else resolved here, looking at the free cores
    only when alone on the node (sibling ranks starting beside it would count as load)."""
    if os.environ.get(LAUNCHED_ENV) and os.environ.get(THREADS_ENV):
        return int(os.environ[THREADS_ENV])
    return resolve_threads(config.system, plan, config.model.hidden, local_world_size,
                           measure_load=local_world_size == 1)


def _announce(log: RunLog, config: Config, plan: Plan, setting: dict, out: Path, *,
              warning: str, records: list[dict]) -> None:
    """Write config.toml and metrics.jsonl's earlier epochs, and print the plan (rank 0)."""
    if warning:
        log.note(f"[yellow]warning:[/] {warning}")
    log.start(to_toml(config, {**setting, **_plan_fields(plan)}, reusable=True), records,
              {**setting, "global_batch": plan.global_batch,
               "updates_per_epoch": plan.updates_per_epoch, "lr": f"{plan.lr:.6g}",
               "lr_scaling": config.optim.lr_scaling, "epochs": config.train.epochs,
               "out": str(out)})
    if plan.lr_schedule != "constant":
        log.note(f"lr schedule: {plan.schedule_text()}")


def _check_resumable(found, skipped: list[str], resume: str, plan: Plan, world_size: int) -> None:
    """The checkpoint exists and this world size trains it with the same batches and lr."""
    if found is None:
        why = f": {'; '.join(skipped)}" if skipped else ""
        raise checkpoint.CheckpointError(f"--resume {resume}: no usable checkpoint in "
                                         f"{Path(resume) / checkpoint.CHECKPOINTS}{why}")
    saved = found.meta["plan"]
    now = {"global_batch": plan.global_batch, "updates_per_epoch": plan.updates_per_epoch,
           "lr": plan.lr}
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] != now[key]]
    if changed and skipped and found.meta["world_size"] == world_size:
        # The config came from a newer checkpoint that the trial load passed over.
        raise UserError(f"--resume {resume}: {found.path.name} was trained with other values "
                        f"than the run's config gives ({', '.join(changed)}); the newer "
                        "checkpoint they came from was passed over")
    if changed:
        raise UserError(f"--resume {resume}: at world size {world_size} the run would train with "
                        f"{', '.join(changed)} (lr_scaling depends on it); resume at its world "
                        f"size {found.meta['world_size']}")


def _announce_resume(log: RunLog, found, skipped: list[str], config: Config,
                     restarts: int) -> None:
    """One line for the checkpoint resumed from, and one if newer folders were unusable."""
    if skipped:
        log.note(f"[yellow]warning:[/] passed over {'; '.join(skipped)}; falling back "
                          f"to the previous complete checkpoint")
    why = f" after a worker failure (restart {restarts})" if restarts else ""
    log.note(f"resuming from {found.path} (epoch {found.epoch} of "
                      f"{config.train.epochs}){why}")


def _resume_hint(out: Path) -> str:
    """After a failed write: what to resume from once the disk has room again."""
    found, _ = checkpoint.latest(out)
    if found is None:
        return "no checkpoint was written; make room and start again"
    return f"the last complete checkpoint is {found.path}: make room, then --resume {out}"


def _plan_fields(plan: Plan) -> dict:
    return {"global_batch": plan.global_batch, "per_rank_batch": plan.per_rank_batch,
            "updates_per_epoch": plan.updates_per_epoch,
            "samples_per_epoch": plan.samples_per_epoch, "base_lr": plan.base_lr,
            "lr": plan.lr, "warmup_steps": plan.warmup_steps,
            "lr_schedule": plan.schedule_text()}


def _check_memory_together(strategy, config: Config, plan: Plan) -> None:
    """Each rank's model, optimizer and batch fit the memory of its device (the node's, for
    the CPU ranks on it together; a GPU's, for the ranks that share it), before anything is
    allocated; else every rank stops with one line."""
    import math

    import torch

    from dptrain.components.memory import available_bytes, require_memory, training_memory

    estimate = training_memory(config, mode=plan.mode, world_size=plan.world_size,
                               global_batch=plan.global_batch)
    device, problem = strategy.device, None
    if device.type == "cuda":
        ranks = math.ceil(strategy.env.local_world_size / torch.cuda.device_count())
        available, where = torch.cuda.mem_get_info(device)[0], f"GPU {device.index}"
    else:
        ranks, available, where = strategy.env.local_world_size, available_bytes(), "this node"
    try:
        require_memory(estimate, config, ranks=ranks, available=available, where=where)
    except UserError as e:
        problem = e
    if not strategy.all_agree(problem is None):
        words = next(w for w in strategy.gather_object(str(problem) if problem else None) if w)
        raise problem or UserError(words)


def _check_out_dir_together(strategy, out: Path, force: bool, lock: RunLock) -> None:
    """Rank 0 locks and checks the run folder; every rank learns the outcome, so none is left
    waiting (a rank 0 that stopped alone would leave the other nodes' ranks hanging)."""
    problem = None
    if strategy.env.is_main:
        try:
            lock.acquire()
            check_out_dir(out, force)
        except UserError as e:
            problem = e
    if not strategy.all_agree(problem is None):
        # Every rank raises rank 0's words: the launcher may show any rank's error. (Every
        # rank joins the gather, rank 0 too.)
        words = strategy.gather_object(str(problem) if problem else None)[0]
        raise problem or UserError(words)


def report_user_error(message: str, *, user_error: bool = True) -> None:
    """Hand an error's line to the launcher (torchelastic's error file) or print it on rank 0.
    user_error: the run cannot succeed as it is; a torchrun restart stops on it at once."""
    from dptrain.distributed.agreement import USER_ERROR_KEY

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    written = False
    if error_file and error_file != os.devnull:  # never replace /dev/null (write_atomic would)
        # Whole or absent: torchrun stops this rank with SIGTERM when a peer dies, possibly
        # mid-write, and cannot parse a half-written file (its agent then crashes).
        text = json.dumps({"message": message, "timestamp": int(time.time()),
                           USER_ERROR_KEY: user_error})
        try:
            write_atomic(Path(error_file), lambda f: f.write(text.encode()))
            written = True
        except UserError:  # its disk is full too: the line goes to stderr instead
            pass
    if not (os.environ.get(LAUNCHED_ENV) and written) and os.environ.get("RANK", "0") == "0":
        err(message)


def mode_flag(
    mode: Annotated[str, typer.Option(help=f"{'|'.join(MODES)}")] = "ddp",
) -> None:
    """Declares the worker's --mode; never called."""


def restart_count() -> int:
    """How often torchrun has restarted the workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _worker(mode: str, force: bool, **flags) -> None:
    # Die at once on Ctrl-C or torchrun's SIGTERM, even inside a collective: no traceback from
    # every rank, and a checkpoint is never left half-renamed (the folder rename is atomic).
    # A worker forked by the CLI would otherwise inherit the handlers of the CLI and its agent.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    _die_with_parent()
    restarts = restart_count()
    config = None
    try:
        if restarts and not flags.get("resume"):
            flags["resume"] = "auto"  # a restart goes on from the newest checkpoint, if any
        config, resume = checkpoint.config_and_resume(mode, flags)
        stopped = stopped_message(Path(config.run.out)) if restarts and config.run.out else ""
        if stopped:
            # The last attempt stopped on a user error (divergence, say), not a crash: it would
            # recur. Every rank stops at once, with that attempt's message.
            _stop(stopped, USER_ERROR_EXIT)
        run(mode, config, force=force, resume=resume, restarts=restarts)
    except checkpoint.Finished as e:  # success: a restart, or a retry, after the last epoch
        if os.environ.get("RANK", "0") == "0":
            print(f"dptrain: {e}", flush=True)
    except UserError as e:
        _stop(str(e), USER_ERROR_EXIT)
    except Exception as e:
        failure = _peer_failure(e, config.system.timeout if config else None)
        if not failure:
            raise  # a bug: the traceback, rank-prefixed by torchrun
        if failure.startswith(LOST_PEER):
            # Only a consequence: give the peer's own failure (a timeout, a crash) the moment
            # it needs to reach torchrun first, which reports the first failures it sees.
            time.sleep(1.0)
        _stop(f"rank {os.environ.get('RANK', '0')}: {failure}", ONE_LINE_EXIT)
    # The run is complete and its files are closed. Skip interpreter finalization: a gloo rank
    # was once seen to abort there ("terminate called without an active exception", SIGABRT)
    # after a finished FSDP run, which turned a good run into a failed job. A worker forked by
    # the CLI returns instead: torchrun waits for its return value, then ends the process the
    # same way, without finalization.
    if os.environ.get(FORKED_ENV):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop(message: str, status: int) -> None:
    report_user_error(message, user_error=status == USER_ERROR_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as after a complete run; the process group is already destroyed


def _peer_failure(error: Exception, timeout: float | None = None) -> str:
    """One line when joining the process group or a collective failed because a peer died, hung
    or could not be reached; "" for anything else. `timeout`: the run's --timeout, seconds."""
    import torch.distributed as dist

    from dptrain.distributed.strategy import DistEnv, SetupFailed

    setup = isinstance(error, SetupFailed)
    text = str(error.__cause__ if setup else error)
    if not setup and not isinstance(error, dist.DistError) and "gloo" not in text.lower():
        return ""
    detail = text.splitlines()[0].rsplit("] ", 1)[-1][:200] if text else ""  # without paths
    if setup:
        return f"{error} ({detail})"
    if "timed out" in text.lower() or "timeout" in text.lower():
        from dptrain.telemetry.hangs import stall_line

        limit = f"--timeout {timeout:g} s" if timeout else "--timeout"
        env = DistEnv.from_environ()  # the heartbeats were read as the error left training
        beats = getattr(error, "heartbeats", None)
        who = stall_line(env.rank, env.world_size, timeout or 0.0, beats) if beats else ""
        return (f"a collective timed out ({limit}): "
                f"{who or 'a peer is hung or dead, or the timeout is too short'} ({detail})")
    return f"{LOST_PEER}, which probably died ({detail})"


def _die_with_parent() -> None:
    """Linux: end this worker when its torchrun agent dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


def main() -> None:
    # Plain tracebacks: a bug in a worker must read like any Python error, rank-prefixed by torchrun.
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(cls=Command)(with_flags(_worker, mode_flag, training_flags, process_group_flags,
                                        ddp_flags))
    app(args=fill_optional_values(sys.argv[1:]))


if __name__ == "__main__":
    main()
