"""The `dptrain` command: parse flags, resolve the config, then train in-process (seq) or
hand the run to the launcher (ddp, fsdp: launch.py).

torch is imported only once a command needs it, so `--help` and config errors are instant.
"""

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from dptrain.storage.checkpoint import Finished
from dptrain.commands import register as register_study_commands
from dptrain.config import Config
from dptrain.errors import USER_ERROR_EXIT, Stopped, UserError, stop_on_signals
from dptrain.flags import (DEFAULTS_NOTE, Command, Group, ddp_flags, fill_optional_values,
                           launch_flags, option_names, process_group_flags, training_flags,
                           with_flags)
from dptrain.distributed.launch import launch, stopped_line
from dptrain.storage.runlog import command_start_time, default_out_dir, err

app = typer.Typer(
    help="Train a 784-16-16-10 MLP on MNIST sequentially, with DDP or with FSDP, and compare.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=Group)


def _train_command(mode: str):
    def command(**flags) -> None:
        started = command_start_time()  # wall_seconds counts from here, in every mode
        out = None
        try:
            config, resume = _config(mode, flags)
            out = Path(config.run.out)
            if mode == "seq":
                from dptrain.worker import run

                run("seq", config, force=flags["force"], resume=resume)
            else:
                launch(mode, config, force=flags["force"], resume=resume, started=started)
        except Finished as e:  # --resume of a finished run: nothing to do is success
            print(f"dptrain: {e}")
        except UserError as e:
            err(str(e))
            raise typer.Exit(USER_ERROR_EXIT) from None
        except (KeyboardInterrupt, Stopped) as e:
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
            err(stopped_line(signum, out, "stopped"))
            raise typer.Exit(128 + signum) from None

    return command


def _config(mode: str, flags: dict) -> tuple[Config, str]:
    """The run's config, with --out decided here (so every message can name it), and the run
    folder to resume ("" = a fresh start)."""
    from dptrain.storage.checkpoint import config_and_resume
    from dptrain.config import ConfigError, ignored_by_mode

    if flags["force"] and flags.get("resume") not in (None, "", "auto"):
        raise UserError(f"--force starts --out over, --resume {flags['resume']} continues it; "
                        "pass one of them")
    config, resume = config_and_resume(mode, flags)
    if ignored_by_mode(mode, config):  # here already, before the data is loaded
        raise ConfigError("; ".join(ignored_by_mode(mode, config)))
    _check_memory(mode, config)
    out = Path(config.run.out) if config.run.out else default_out_dir(mode)
    return with_data_dir(_with_out(config, out), typed=flags.get("data_dir") is not None), resume


def with_data_dir(config: Config, *, typed: bool) -> Config:
    """The config with data_dir where MNIST is found, as an absolute path (recorded_location)."""
    from dataclasses import replace

    from dptrain.components.data import recorded_location

    found, note = recorded_location(config.data.data_dir, typed=typed)
    if note:
        print(f"dptrain: warning: {note}", file=sys.stderr)
    return replace(config, data=replace(config.data, data_dir=found))


def _check_memory(mode: str, config: Config) -> None:
    """Refuse, before starting anything, a model that this machine's memory cannot hold: all
    of its training state on CPU ranks; else its parameters, which each rank builds on the host
    (the workers check their GPU's memory themselves)."""
    from dptrain.components.data import TRAIN_SAMPLES
    from dptrain.components.memory import (VALUE_BYTES, MemoryEstimate, parameter_count,
                                           require_memory, training_memory)

    ranks = 1 if mode == "seq" else config.launch.nproc
    world_size = ranks * (1 if mode == "seq" else config.launch.nnodes)
    estimate = training_memory(config, mode=mode, world_size=world_size, global_batch=(
        TRAIN_SAMPLES if config.train.full_batch else min(config.train.batch_size, TRAIN_SAMPLES)))
    if config.system.device != "cpu":
        estimate = MemoryEstimate(parameter_count(config.model.hidden) * VALUE_BYTES, 0, 0, 0)
    require_memory(estimate, config, ranks=ranks)


app.command("seq", cls=Command, help="Train in this process: the sequential baseline.\n\n"
                                      + DEFAULTS_NOTE)(
    with_flags(_train_command("seq"), training_flags))
app.command("ddp", cls=Command, help="Train with DistributedDataParallel on --nproc workers "
                                     "(torchrun).\n\n" + DEFAULTS_NOTE)(
    with_flags(_train_command("ddp"), training_flags, process_group_flags, ddp_flags,
               launch_flags))
app.command("fsdp", cls=Command, help="Train with FSDP2 on --nproc workers (torchrun): "
                                      "parameters sharded over the ranks; layers of 4 MiB or "
                                      "more are units of their own, the rest one unit.\n\n"
                                      + DEFAULTS_NOTE)(
    with_flags(_train_command("fsdp"), training_flags, process_group_flags, launch_flags))
register_study_commands(app)  # sweep, plot, report, evaluate, predict


def _print_version(value: bool) -> None:
    if value:
        from dptrain import __version__

        print(f"dptrain {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print dptrain's version and exit.")] = False,
) -> None:
    """Train a 784-16-16-10 MLP on MNIST sequentially, with DDP or with FSDP, and compare."""


@app.command("export", cls=Command,
             help="Write the model of a checkpoint (or of a run's newest checkpoint) as a plain "
                  "model.pt, the format of a finished run's model.pt.")
def export_command(
    source: Annotated[Path, typer.Argument(help="A checkpoint folder (RUN_DIR/checkpoints/"
                                                "epoch-NNNN, or RUN_DIR/checkpoints/best: "
                                                "--keep-best) or a run folder (its newest "
                                                "checkpoint).")],
    out: Annotated[Path, typer.Option("--out", help="The file to write.")] = Path("model.pt"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    from dptrain.storage.checkpoint import export

    try:
        if out.exists() and not force:
            raise UserError(f"--out {out} exists; choose another file, or pass --force")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        checkpoint = export(source, out)
    except UserError as e:
        err(str(e))
        raise typer.Exit(USER_ERROR_EXIT) from None
    for reason in checkpoint.passed_over:  # a newer folder was damaged, or refused
        print(f"dptrain: warning: passed over {reason}", file=sys.stderr)
    print(f"wrote {out}: the model of {checkpoint.path} (epoch {checkpoint.epoch}, "
          f"{checkpoint.meta['mode']} x {checkpoint.meta['world_size']})")


def _with_out(config: Config, out: Path) -> Config:
    from dataclasses import replace

    return replace(config, run=replace(config.run, out=str(out)))


def _usage_error_line(error) -> str:
    """A bad flag in one line; a ddp/fsdp flag given to seq says where it belongs."""
    command = error.ctx.info_name if error.ctx and error.ctx.parent else ""
    name = getattr(error, "option_name", "")
    if command in ("seq", "fsdp") and name in option_names(ddp_flags):
        return (f"{name}: one of ddp's own knobs; {command} "
                + ("trains in one process, without a gradient sum" if command == "seq" else
                   "reduce-scatters its gradients and shards its optimizer itself")
                + f" (dptrain ddp {name} ...)")
    if command == "seq" and name in option_names(process_group_flags, launch_flags):
        return (f"{name}: seq trains in one process, without workers or a process group; "
                f"{name} belongs to ddp and fsdp (dptrain ddp {name} ...)")
    return f"{error.format_message()} (see dptrain{' ' + command if command else ''} --help)"


def main() -> None:
    """Entry point: a bad flag is one line on stderr and exit status 2, like any user error."""
    try:  # recent typer vendors click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    no_args = getattr(click_errors, "NoArgsIsHelpError", ())

    stop_on_signals()
    try:
        status = app(args=fill_optional_values(sys.argv[1:]), standalone_mode=False)
    except no_args as e:
        print(e.format_message())
        status = 0
    except click_errors.UsageError as e:
        err(_usage_error_line(e))
        status = USER_ERROR_EXIT
    except typer.Abort:  # Ctrl-C in a command that has nothing more to say about it
        err("interrupted")
        status = 128 + signal.SIGINT
    except Stopped as e:
        err(f"stopped by signal {signal.Signals(e.signum).name}")
        status = 128 + e.signum
    # Skip interpreter finalization: with torch loaded it takes about a second, and the run's
    # files are already closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
