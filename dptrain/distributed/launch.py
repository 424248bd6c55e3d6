"""Starting the workers of a ddp or fsdp run: torchrun inside this process, how it starts the
workers (forked from here, or fresh processes), the rendezvous, and a failed worker as one line.

The CLI calls `launch` once flags and config are settled. No torch at module level: `--help`
and config errors stay instant.
"""

import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import typer

from dptrain.config import Config, resolve, resolve_threads, to_toml
from dptrain.errors import ONE_LINE_EXIT, USER_ERROR_EXIT, UserError
from dptrain.storage.runlog import (LAUNCH_TIME_ENV, LOCK_HELD_ENV, SUMMARY, RunLock,
                                    check_out_dir, err, peak_rss_bytes, read_json,
                                    write_summary)

# The launcher's scratch folder (the workers' config, torchrun's error files) is
# $TMPDIR/dptrain-<pid>-*, not inside --out: a worker must be able to report a full disk of
# --out. A launcher killed by SIGKILL cannot remove it; the next launch removes those of
# processes that are gone.
SCRATCH_PREFIX = "dptrain-"
# Seconds torchrun's agent gives a worker between SIGTERM and SIGKILL when it stops the others
# after a failure (torch's default: 30). Our workers die at SIGTERM at once; only a stopped or
# wedged one waits out the grace, which once added 30 s to the end of every such job.
STOP_GRACE_SECONDS = 5


def stopped_line(signum: int, out: Path | None, what: str) -> str:
    """One line for a run stopped by a signal: what is left to resume from."""
    line = f"{what} by signal {signal.Signals(signum).name}"
    if out is None:
        return line
    from dptrain.storage.checkpoint import latest

    found, _ = latest(out)
    if found is None:
        return f"{line}; no checkpoint was written in {out}"
    return f"{line}; the last complete checkpoint is {found.path} (continue with --resume {out})"


def torchrun_args(config: Config) -> list[str]:
    """torchrun's own flags: a free local port for one node, the given rendezvous for several."""
    launch = config.launch
    args = [f"--nproc-per-node={launch.nproc}", f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        return args + ["--standalone"]
    args += [f"--nnodes={launch.nnodes}", f"--rdzv-backend={launch.rdzv_backend}",
             f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--node-rank={launch.node_rank}"]
    if launch.rdzv_id:
        args.append(f"--rdzv-id={launch.rdzv_id}")
    return args


def launch(mode: str, config: Config, *, force: bool, resume: str, started: float) -> None:
    """Check everything a worker would reject, then run torchrun in this process."""
    from dptrain.components.data import load_mnist, split_indices
    from dptrain.worker import LAUNCHED_ENV, THREADS_ENV

    # Decode (or download) the data once here, so that workers only map the cache.
    mnist = load_mnist(config.data.data_dir)
    n_train = len(split_indices(len(mnist.labels), config.data.split_seed).train)
    plan = resolve(config, mode=mode, world_size=config.launch.nproc * config.launch.nnodes,
                   n_train=n_train)
    out = Path(config.run.out)
    lock = RunLock(out)
    if config.launch.nnodes == 1:
        # This process outlives torchrun's restarts, so no other run can take the folder
        # between two attempts. With several nodes rank 0 locks it, wherever it runs.
        lock.acquire()
        os.environ[LOCK_HELD_ENV] = str(out.resolve())
    if not resume:
        check_out_dir(out, force)
    if config.launch.rdzv_endpoint and (config.launch.rdzv_backend == "c10d"
                                        or config.launch.node_rank == 0):
        check_rendezvous_port(config.launch.rdzv_endpoint)

    # Chosen once here, before any worker loads the node, and the same for every worker.
    threads = resolve_threads(config.system, plan, config.model.hidden, config.launch.nproc)
    os.environ.update({LAUNCH_TIME_ENV: repr(started), LAUNCHED_ENV: "1",
                       THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads)})
    ask_cuda_through_nvml()
    # Restarted workers must not meet in the rendezvous store of the attempt before: with the
    # store shared (torch's default) they read its stale addresses and cannot connect
    # (pytorch/pytorch#135712). A store per attempt avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with scratch() as tmp:
        resolved = tmp / "config.toml"
        resolved.write_text(to_toml(config))
        worker = [f"--mode={mode}", f"--config={resolved}"]
        worker += (["--force"] if force else []) + ([f"--resume={resume}"] if resume else [])
        _torchrun(torchrun_args(config) + [f"--log-dir={tmp / 'torchrun'}"]
                  + worker_entry(mode, config) + worker, out)
    summary = read_json(out / SUMMARY)
    if isinstance(summary, dict) and isinstance(summary.get("memory"), dict):
        # On the node that held rank 0. The workers were forked from this process and share
        # its pages (torch, ...).
        # (wall_seconds stays rank 0's: the number it printed, from `started` on.)
        summary["memory"]["launcher_peak_rss_bytes"] = peak_rss_bytes()
        write_summary(out, summary)
    lock.release()
    os.environ.pop(LOCK_HELD_ENV, None)


@contextmanager
def scratch():
    """The launcher's scratch folder, removed at the end, where torchrun writes what it would
    otherwise leave in $TMPDIR: its log folder with the workers' error files (the launcher
    passes --log-dir inside it: no torchelastic_* left behind) and, while torchrun runs, every
    temporary file of this process (a forked worker's traceback, pytorch-errorfile-*.pickle,
    which torch never deletes)."""
    remove_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
        saved = tempfile.tempdir
        tempfile.tempdir = tmp
        try:
            yield Path(tmp)
        finally:
            tempfile.tempdir = saved


def remove_stale_scratch() -> None:
    """Remove the scratch folders of launchers that were killed (their pid is gone)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # alive (or another user's): leave it
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


# Makes torch.cuda.is_available() and device_count() ask NVML, not CUDA (torch/cuda/__init__.py).
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
FRESH = ["-m", "dptrain.worker"]


def ask_cuda_through_nvml() -> None:
    """Make this process's CUDA questions (cuda_run here, torchrun's LaunchConfig next) leave a
    fork usable, whatever the user's environment says (=0 included).

    Asked the usual way (cudaGetDeviceCount), even a "no" poisons a fork: torch then refuses
    CUDA in every forked child ("Cannot re-initialize CUDA in forked subprocess"). NVML's
    answer does not. The workers inherit the setting but do not trust it: they decide their
    device by CUDA's own answer (strategy.cuda_available), as seq does.
    """
    os.environ[NVML_CHECK_ENV] = "1"


def worker_entry(mode: str, config: Config) -> list[str]:
    """How torchrun starts the workers (launch.start_method): forked from this process, or as
    fresh `python -m dptrain.worker` processes. auto forks CPU runs and starts CUDA runs fresh.

    A forked worker can use CUDA only if nothing in this process asked CUDA itself (see
    ask_cuda_through_nvml). Where NVML cannot answer (no NVML library, MIG devices named in
    CUDA_VISIBLE_DEVICES), torch falls back to that question: then forked CUDA workers could
    not start, and they start fresh instead, with one line. Whether forked CUDA workers start
    faster is for a GPU machine to show (benchmarks/gpu_check.py); until then CUDA runs fork
    only on request.
    """
    method = config.launch.start_method
    cuda = cuda_run(config)
    if method == "auto":
        method = "fresh" if cuda else "fork"
    if method == "fresh":
        return FRESH
    entry = fork_workers(mode)
    if cuda and fork_poisoned():
        from dptrain.worker import FORKED_ENV

        os.environ.pop(FORKED_ENV, None)
        print("dptrain: warning: --start-method fork: NVML could not say whether this node has "
              "GPUs, so torch asked CUDA itself, after which forked workers cannot use CUDA; "
              "starting the workers fresh instead", file=sys.stderr, flush=True)
        return FRESH
    return entry


def cuda_run(config: Config) -> bool:
    """True when the workers will train on GPUs. Asked as torchrun's LaunchConfig asks next
    (through NVML, ask_cuda_through_nvml), so that fork_poisoned() sees what that question
    does; a CPU run asks nothing (a poisoned fork cannot harm CPU workers)."""
    import torch

    device = config.system.device
    if device == "cpu":
        return False
    return torch.cuda.is_available() or device == "cuda"


def fork_poisoned() -> bool:
    """Whether a worker forked from this process now could not use CUDA. torch records it only
    in the child (a fork handler that any CUDA query or initialization installs), so a child
    is forked to ask, and exits at once."""
    import torch

    in_bad_fork = getattr(torch._C, "_cuda_isInBadFork", None)
    if in_bad_fork is None:  # torch built without CUDA
        return False
    pid = os.fork()
    if pid == 0:
        os._exit(1 if in_bad_fork() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0


def fork_workers(mode: str) -> list[str]:
    """torchrun flags that fork the workers from this process, which imports for them first.

    A worker started afresh imports torch, then torch._dynamo (DDP's constructor and FSDP's
    DTensors import it): ~3 s, as long as the whole training on a small machine, paid again
    by every worker at once on the same cores. Forked, they start with all of it in memory,
    shared copy-on-write. (Cluster scripts start `python -m dptrain.worker` the usual way.)
    """
    from dptrain.worker import FORKED_ENV

    os.environ[FORKED_ENV] = "1"
    import torch._dynamo  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    import dptrain.train  # noqa: F401
    import dptrain.worker

    if mode == "fsdp":
        import torch.distributed.fsdp  # noqa: F401
    sys.stdout.flush()  # a child would print again whatever is still buffered
    sys.stderr.flush()
    return ["--start-method=fork", "--run-path", dptrain.worker.__file__]


def check_rendezvous_port(endpoint: str) -> None:
    """This node hosts the rendezvous when HOST is one of its addresses: the port must be free.

    torchrun would otherwise connect to whatever holds the port as a client of its store, and
    wait on it without a timeout. A HOST of another machine is left to torchrun.
    """
    host, _, port = endpoint.rpartition(":")
    try:
        address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--rdzv-endpoint {endpoint}: cannot resolve {host} ({e.strerror})") from None
    with socket.socket(address[0], socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            probe.bind(address[4])
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"--rdzv-endpoint {endpoint}: port {port} is already in use on "
                                "this machine; choose a free port (one machine needs no "
                                "endpoint: use --nproc)") from None
            # EADDRNOTAVAIL: another machine's address, which hosts the store itself


def _torchrun(argv: list[str], out: Path) -> None:
    """torch.distributed.run in-process; a worker's failure becomes one line, not a report."""
    import logging

    # torchrun's loggers set their own levels from $LOGLEVEL when their modules load.
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Forked workers are stopped by torch.multiprocessing, which warns "Terminating process
    # ... via signal SIGTERM" for each: the failure's one line says what happened.
    logging.getLogger("torch.multiprocessing").setLevel(logging.CRITICAL)
    honour_stop_grace()
    try:
        run(parse_args([f"--shutdown-timeout={stop_grace()}", *argv]))
    except ChildFailedError as e:
        rank, failure = _first_failure(e)
        # What the worker recorded in its error file, if it could write one.
        written = (failure.error_file_data.get("message")
                   if os.path.isfile(failure.error_file) else None)
        if failure.exitcode == USER_ERROR_EXIT:
            if not written:  # the worker could not write its error file and printed the line
                raise typer.Exit(USER_ERROR_EXIT) from None
            raise UserError(failure.message) from None
        if failure.exitcode == ONE_LINE_EXIT:
            err(failure.message)
        elif failure.exitcode < 0:
            err(stopped_line(-failure.exitcode, out, f"worker rank {rank} was killed"))
        else:
            # A forked worker's traceback is only in its error file; a fresh process printed it.
            if isinstance(written, dict) and written.get("extraInfo", {}).get("py_callstack"):
                print(written["extraInfo"]["py_callstack"].rstrip(), file=sys.stderr)
            err(f"worker rank {rank} failed with exit code {failure.exitcode}: "
                f"{_first_line(failure.message)}; its traceback is above")
        raise typer.Exit(1) from None
    except SignalException as e:  # torchrun has already stopped the workers
        err(stopped_line(e.sigval, out, "stopped") + "; the workers were terminated")
        raise typer.Exit(128 + int(e.sigval)) from None


def stop_grace() -> int:
    """torchrun's grace before SIGKILL (seconds): $TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else ours."""
    return int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", STOP_GRACE_SECONDS))


def honour_stop_grace() -> None:
    """Make torchrun stop the other workers after a failure within stop_grace() seconds.

    torch 2.14 applies its shutdown timeout (--shutdown-timeout) on the agent's signal path
    only. After a worker fails, the others are stopped with a fixed 30 s between SIGTERM and
    SIGKILL: LocalElasticAgent._stop_workers calls _shutdown() without the timeout
    (pytorch/pytorch#119856, fix proposed in #192815), a worker process context closes itself
    with PContext.close()'s default, and forked workers are first stopped by
    torch.multiprocessing's ProcessContext.join(grace_period=None). A worker stopped by
    SIGSTOP, or wedged, kept the job 30 s past its end. Our workers die at SIGTERM at once,
    so a short grace loses nothing. Applied to this process's torchrun only, and only where
    torch has the methods and parameters it relies on.
    """
    import inspect

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.multiprocessing.spawn import ProcessContext

    def _stop_workers(agent, *_args, **_kwargs) -> None:
        agent._shutdown(timeout=getattr(agent, "_shutdown_timeout", 30))

    if hasattr(LocalElasticAgent, "_shutdown") and not getattr(
            LocalElasticAgent._stop_workers, "dptrain", False):
        _stop_workers.dptrain = True
        LocalElasticAgent._stop_workers = _stop_workers

    close = PContext.close
    if "timeout" in inspect.signature(close).parameters and not getattr(close, "dptrain", False):
        def bounded_close(context, death_sig=None, timeout=None):
            return close(context, death_sig, stop_grace() if timeout is None else timeout)

        bounded_close.dptrain = True
        PContext.close = bounded_close

    join = ProcessContext.join
    if "grace_period" in inspect.signature(join).parameters and not getattr(
            join, "dptrain", False):
        def bounded_join(context, timeout=None, grace_period=None):
            # grace_period: a wait for the others to end by themselves, SIGTERM, the same
            # wait again, SIGKILL; half of ours each.
            return join(context, timeout, stop_grace() / 2 if grace_period is None
                        else grace_period)

        bounded_join.dptrain = True
        ProcessContext.join = bounded_join


def cluster_main(argv: list[str]) -> None:
    """`python -m dptrain.distributed.launch [torchrun flags] -m dptrain.worker ...`: torchrun
    as the cluster scripts run it on each node, with what the CLI's launcher adds: torchrun's
    logs and error files in a scratch folder removed at the end (no torchelastic_* left per
    node and run), and a 5 s grace for a stopped worker instead of 30."""
    from torch.distributed.run import main as torchrun

    honour_stop_grace()
    with scratch() as tmp:
        # The flags given come after ours, so that a --log-dir of the user's wins.
        torchrun([f"--shutdown-timeout={stop_grace()}", f"--log-dir={tmp / 'torchrun'}", *argv])


def _first_line(message) -> str:
    """A failure's message: text, or the error-file record of a forked worker (a dict)."""
    while isinstance(message, dict):
        message = message.get("message", "")
    return str(message).splitlines()[0] if message else "no message"


def _first_failure(error):
    """The failure that explains the others: a user error, then a worker killed by a signal
    other than the SIGTERM torchrun stops the rest with, then a timed-out collective (its peers
    then lose it), then a lost peer, then the earliest."""
    first = min(failure.timestamp for failure in error.failures.values())

    def rank_of(item):
        rank, failure = item
        code = failure.exitcode
        timed_out = code == ONE_LINE_EXIT and "timed out" in str(failure.message)
        # A SIGKILL that came a grace period after the first failure is torchrun's own, for
        # a worker that SIGTERM could not end (a stopped one): a consequence, not the cause.
        killed = code < 0 and code != -signal.SIGTERM and not (
            code == -signal.SIGKILL and failure.timestamp > first + 1)
        cause = (0 if code == USER_ERROR_EXIT else 1 if killed else 2 if timed_out
                 else 3 if code == ONE_LINE_EXIT else 4)
        return cause, failure.timestamp, rank

    return min(error.failures.items(), key=rank_of)


if __name__ == "__main__":
    cluster_main(sys.argv[1:])
