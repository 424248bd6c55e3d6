"""The `dptrain` command: parse flags, resolve the config, then train in-process (seq) or
launch workers through torchrun (ddp, fsdp).

torch is imported only once a command needs it, so `--help` and config errors are instant.
"""

import errno
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import typer

from dptrain.config import Config, resolve, resolve_threads, to_toml
from dptrain.errors import USER_ERROR_EXIT, UserError
from dptrain.commands import register as register_study_commands
from dptrain.flags import config_from_flags, launch_flags, training_flags, with_flags
from dptrain.runlog import (LAUNCH_TIME_ENV, SUMMARY, check_out_dir, default_out_dir, err,
                            write_summary)

app = typer.Typer(
    help="Train a 784-16-16-10 MLP on MNIST sequentially, with DDP or with FSDP, and compare.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _train_command(mode: str):
    def command(**flags) -> None:
        started = time.time()
        try:
            config = config_from_flags(flags)
            if mode == "seq":
                from dptrain.worker import run

                run("seq", config, force=flags["force"])
            else:
                launch(mode, config, force=flags["force"], started=started)
        except UserError as e:
            err(str(e))
            raise typer.Exit(USER_ERROR_EXIT) from None

    return command


app.command("seq", help="Train in this process: the sequential baseline.")(
    with_flags(_train_command("seq"), training_flags))
app.command("ddp", help="Train with DistributedDataParallel on --nproc workers (torchrun).")(
    with_flags(_train_command("ddp"), training_flags, launch_flags))
app.command("fsdp", help="Train with FSDP2 (fully_shard per Linear, then the root) on --nproc "
                         "workers (torchrun).")(
    with_flags(_train_command("fsdp"), training_flags, launch_flags))
register_study_commands(app)  # sweep, plot, report, evaluate, predict


def torchrun_args(config: Config) -> list[str]:
    """torchrun's own flags: a free local port for one node, the given rendezvous for several."""
    launch = config.launch
    args = [f"--nproc-per-node={launch.nproc}", "--max-restarts=0"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        return args + ["--standalone"]
    args += [f"--nnodes={launch.nnodes}", f"--rdzv-backend={launch.rdzv_backend}",
             f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--node-rank={launch.node_rank}"]
    if launch.rdzv_id:
        args.append(f"--rdzv-id={launch.rdzv_id}")
    return args


def launch(mode: str, config: Config, *, force: bool, started: float) -> None:
    """Check everything a worker would reject, then run torchrun in this process."""
    from dptrain.data import load_mnist, split_indices
    from dptrain.worker import LAUNCHED_ENV

    # Decode (or download) the data once here, so that workers only map the cache.
    mnist = load_mnist(config.data.data_dir)
    n_train = len(split_indices(len(mnist.labels), config.data.split_seed).train)
    resolve(config, mode=mode, world_size=config.launch.nproc * config.launch.nnodes,
            n_train=n_train)
    out = Path(config.run.out) if config.run.out else default_out_dir(mode)
    check_out_dir(out, force)
    config = _with_out(config, out)
    if config.launch.rdzv_endpoint and (config.launch.rdzv_backend == "c10d"
                                        or config.launch.node_rank == 0):
        check_rendezvous_port(config.launch.rdzv_endpoint)

    threads = resolve_threads(config.system, config.launch.nproc)
    os.environ.update({LAUNCH_TIME_ENV: repr(started), LAUNCHED_ENV: "1",
                       "OMP_NUM_THREADS": str(threads)})
    with tempfile.TemporaryDirectory(prefix="dptrain-") as tmp:
        resolved = Path(tmp) / "config.toml"
        resolved.write_text(to_toml(config))
        worker = ["-m", "dptrain.worker", f"--mode={mode}", f"--config={resolved}"]
        _torchrun(torchrun_args(config) + worker + (["--force"] if force else []))
    if (out / SUMMARY).exists():  # on the node that held rank 0: time the whole command
        summary = json.loads((out / SUMMARY).read_text())
        summary["wall_seconds"] = time.time() - started
        write_summary(out, summary)


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


def _with_out(config: Config, out: Path) -> Config:
    from dataclasses import replace

    return replace(config, run=replace(config.run, out=str(out)))


def _torchrun(argv: list[str]) -> None:
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
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == USER_ERROR_EXIT:
            raise UserError(failure.message) from None
        err(f"worker rank {rank} failed with exit code {failure.exitcode}: "
            f"{failure.message.splitlines()[0] if failure.message else 'no message'}; "
            "its traceback is above")
        raise typer.Exit(1) from None
    except SignalException as e:  # torchrun has already stopped the workers
        err(f"stopped by signal {e.sigval.name}; the workers were terminated")
        raise typer.Exit(128 + int(e.sigval)) from None


def main() -> None:
    """Entry point: a bad flag is one line on stderr and exit status 2, like any user error."""
    try:  # recent typer vendors click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    no_args = getattr(click_errors, "NoArgsIsHelpError", ())

    try:
        status = app(standalone_mode=False)
    except no_args as e:
        print(e.format_message())
        status = 0
    except click_errors.UsageError as e:
        command = f" {e.ctx.info_name}" if e.ctx and e.ctx.parent else ""
        err(f"{e.format_message()} (see dptrain{command} --help)")
        status = USER_ERROR_EXIT
    except typer.Abort:
        err("interrupted")
        status = 130
    sys.exit(status or 0)
