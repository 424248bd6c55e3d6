"""The study and model-use commands: sweep, plot, report, evaluate, predict.

Registered on the CLI's app by `register(app)`. Importing this module costs nothing: torch,
matplotlib and Pillow are imported inside the commands that need them.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from dptrain.errors import USER_ERROR_EXIT, UserError
from dptrain.flags import (Command, config_from_flags, process_group_flags, training_flags,
                           with_flags)
from dptrain.runlog import default_out_dir, err, make_console


def sweep_flags(
    mode: Annotated[str, typer.Option(help="The parallel mode to sweep: ddp|fsdp.",
                                      rich_help_panel="Sweep")] = "ddp",
    nproc: Annotated[str, typer.Option(help="Process counts, comma-separated.",
                                       rich_help_panel="Sweep")] = "1,2,4,6,8",
    no_seq: Annotated[bool, typer.Option("--no-seq", help="Skip the seq reference run (then no "
                                         "speedups).", rich_help_panel="Sweep")] = False,
) -> None:
    """Declares the sweep's own options; never called."""


def _user_errors(function):
    """Run a command body; a UserError becomes one line and exit status 2."""
    def wrapped(**kwargs) -> None:
        try:
            function(**kwargs)
        except UserError as e:
            err(str(e))
            raise typer.Exit(USER_ERROR_EXIT) from None

    wrapped.__doc__ = function.__doc__
    return wrapped


def sweep(mode: str, nproc: str, no_seq: bool, **flags) -> None:
    from rich.markup import escape

    from dptrain.sweep import SweepInterrupted, parse_nprocs, run_sweep, sweep_table

    counts = parse_nprocs(nproc)
    config = config_from_flags(flags)
    out = Path(flags["out"]) if flags.get("out") else default_out_dir(f"sweep-{mode}")
    console = make_console(highlight=False)  # in a log, the closing hint must not wrap
    try:
        rows = run_sweep(mode, counts, config, out, with_seq=not no_seq, force=flags["force"],
                         echo=console.print)
    except (SweepInterrupted, KeyboardInterrupt):  # Ctrl-C reaches the runs and the sweep
        err(f"interrupted; the runs that finished are in {out}/sweep.csv")
        raise typer.Exit(130) from None
    console.print(sweep_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        console.print(f"[red]{r['mode']} x {r['nproc']} failed[/]: {escape(r['error'])}")
    console.print(f"results in [bold]{out}[/] (sweep.csv, sweep.json); "
                  f"figures: dptrain report {out}" + (f"; [red]{len(failed)} run(s) failed[/]" if failed else ""))


def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders to draw on one figure.")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("plot.png"),
) -> None:
    from dptrain.plots import plot_runs

    print(f"wrote {plot_runs(run_dirs, out)}")


def report(
    sweep_dir: Annotated[Path, typer.Argument(help="A folder written by `dptrain sweep`.")],
) -> None:
    from dptrain.plots import report as draw

    for path in draw(sweep_dir):
        print(f"wrote {path}")


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (model.pt, config.toml).")],
    confusion_png: Annotated[Optional[Path], typer.Option(
        help="Also save the confusion matrix as this PNG.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(
        help="MNIST folder (else the run's data_dir, $DPTRAIN_DATA_DIR, the cache).")] = None,
) -> None:
    from dptrain.inference import evaluate_run, print_evaluation

    result = evaluate_run(run_dir, data_dir)
    print_evaluation(result)
    if confusion_png is not None:
        from dptrain.inference import save_confusion_png

        print(f"wrote {save_confusion_png(result, confusion_png)}")


def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (model.pt, config.toml).")],
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files of single digits.")],
) -> None:
    from dptrain.inference import predict_files

    if not predict_files(run_dir, images):
        raise typer.Exit(USER_ERROR_EXIT)


def register(app: typer.Typer) -> None:
    app.command("sweep", cls=Command, help="Train once per process count (plus a seq reference); "
                                           "write sweep.csv and sweep.json.")(
        with_flags(_user_errors(sweep), sweep_flags, training_flags, process_group_flags))
    app.command("plot", cls=Command,
                help="Loss and validation accuracy curves of runs, as one PNG.")(_wrap(plot))
    app.command("report", cls=Command,
                help="The figures of a sweep, written into its folder.")(_wrap(report))
    app.command("evaluate", cls=Command, help="Test accuracy, per-class precision/recall and the "
                                              "confusion matrix of a trained run.")(_wrap(evaluate))
    app.command("predict", cls=Command,
                help="Predict the digit in your own images with a trained run.")(_wrap(predict))


def _wrap(function):
    """_user_errors, keeping the function's signature for Typer."""
    import functools

    wrapped = _user_errors(function)
    functools.update_wrapper(wrapped, function)
    return wrapped
