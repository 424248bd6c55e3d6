"""The study and model-use commands: sweep, plan, plot, report, evaluate, predict.

Registered on the CLI's app by `register(app)`. Importing this module costs nothing: torch,
matplotlib and Pillow are imported inside the commands that need them.
"""

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from dptrain.errors import USER_ERROR_EXIT, UserError
from dptrain.flags import (CHECKPOINT, SYSTEM, TRAIN, Command, _opt, config_from_flags,
                           ddp_flags, process_group_flags, training_flags, with_flags)
from dptrain.storage.runlog import default_out_dir, err, make_console


def sweep_flags(
    mode: Annotated[Optional[str], typer.Option(
        help="The parallel mode(s) to sweep: ddp, fsdp or ddp,fsdp; seq alone: a grid of seq "
             "runs. \\[default: ddp]", show_default=False, rich_help_panel="Sweep")] = None,
    nproc: Annotated[Optional[str], typer.Option(
        help="Process counts, comma-separated. \\[default: 1,2,4,6,8]", show_default=False,
        rich_help_panel="Sweep")] = None,
    vary: Annotated[Optional[list[str]], typer.Option(
        "--vary", metavar="KEY=V1,V2", show_default=False, rich_help_panel="Sweep",
        help="Also vary a config key, crossed with the modes, nproc and other --vary (Hydra's "
             "multirun syntax). Separate values with ':' when they hold commas: "
             "--vary hidden=16,16:256,256. Each cell runs in its own folder, with its own seq "
             "reference. Repeatable.")] = None,
    no_seq: Annotated[bool, typer.Option("--no-seq", help="Skip the seq reference runs (then no "
                                         "speedups).", rich_help_panel="Sweep")] = False,
) -> None:
    """Declares the sweep's own options; never called."""


# The training flags that a sweep reads otherwise than a training command.
SWEEP_HELPS = {
    "out": Annotated[Optional[str], _opt("Sweep folder: one run folder per cell and run, and "
                                         "sweep.csv.", "runs/sweep-<modes>-<timestamp>", TRAIN)],
    "resume": Annotated[Optional[str], _opt(
        "Continue the interrupted sweep in SWEEP_DIR as it was planned (it takes no other flag).",
        "a fresh start", CHECKPOINT, "--resume")],
    "threads": Annotated[Optional[int], _opt(
        "Intra-op threads of every run, seq included, so that a speedup compares processes, "
        "not thread counts; 0 = 1.", 1, SYSTEM)],
}


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


def sweep(mode: str | None, nproc: str | None, vary: list[str] | None, no_seq: bool,
          **flags) -> None:
    from rich.markup import escape

    from dptrain.study.sweep import SweepInterrupted, run_sweep, stop_on_signal, sweep_table

    grid, config, out, resume = _sweep_plan(mode, nproc, vary, no_seq, flags)
    console = make_console(highlight=False)  # in a log, the closing hint must not wrap
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    try:
        rows = run_sweep(grid, config, out, force=flags["force"], resume=resume,
                         echo=console.print)
    except (SweepInterrupted, KeyboardInterrupt) as e:  # the running run was stopped too
        signum = e.signum if isinstance(e, SweepInterrupted) else signal.SIGINT
        what = ("interrupted" if signum == signal.SIGINT
                else f"stopped by signal {signal.Signals(signum).name}")
        err(f"{what}; the runs that finished are in {out}/sweep.csv; continue with "
            f"`dptrain sweep --resume {out}`")
        raise typer.Exit(128 + signum) from None
    console.print(sweep_table(rows, [a.key for a in grid.axes]))
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        console.print(f"[red]{escape(r['run_dir'])} failed[/]: {escape(r['error'])}")
    again = (f"; run them again with `dptrain sweep --resume {out}`"
             if any(r.get("transient") for r in failed) else "")
    console.print(f"results in [bold]{out}[/] (sweep.csv, sweep.json); "
                  f"figures: dptrain report {out}"
                  + (f"; [red]{len(failed)} run(s) failed[/]{again}" if failed else ""))


def _sweep_plan(mode, nproc, vary, no_seq, flags: dict):
    """(grid, base config, folder, resuming?) from the flags, or from the folder --resume
    names: a sweep resumes as it was planned, so it takes no other flag."""
    from dptrain.study.sweep import (DEFAULT_NPROCS, Grid, grid_to_resume, parse_modes,
                                     parse_nprocs, parse_vary)

    if flags.get("resume"):
        if flags["resume"] == "auto":
            raise UserError("sweep --resume takes the folder of the interrupted sweep, "
                            "e.g. --resume runs/sweep-ddp-...; 'auto' is for a training run")
        out = Path(flags["resume"])
        given = [name for name, value in {**flags, "mode": mode, "nproc": nproc, "vary": vary,
                                          "no_seq": no_seq}.items()
                 if value not in (None, False) and name not in ("resume", "out")]
        if flags.get("out") and Path(flags["out"]).resolve() != out.resolve():
            given.append("out")
        if given:
            names = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(f"--resume {out} continues that sweep as it was planned; drop {names}")
        return (*grid_to_resume(out), out, True)
    modes = parse_modes(mode or "ddp")
    if modes == ["seq"] and (nproc or no_seq):
        raise UserError("--mode seq sweeps seq runs only (one process each); drop "
                        + ("--nproc" if nproc else "--no-seq"))
    grid = Grid(tuple(modes), tuple(parse_nprocs(nproc or DEFAULT_NPROCS)),
                tuple(parse_vary(v) for v in vary or []), with_seq=not no_seq)
    keys = [a.key for a in grid.axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--vary: a key is given twice ({', '.join(keys)}); list all its "
                        "values in one --vary")
    from dptrain.cli import with_data_dir

    # Every run, and the sweep's own config files, name the data by its absolute folder.
    config = with_data_dir(config_from_flags(flags), typed=flags.get("data_dir") is not None)
    out = Path(flags["out"]) if flags.get("out") else default_out_dir(f"sweep-{'-'.join(modes)}")
    return grid, config, out, False


def plan_flags(
    target_accuracy: Annotated[Optional[float], typer.Option(
        help="The validation accuracy to reach. Else the target is what --epochs (the "
             "config's, 25 built in) reach at the configured batch. \\[default: none]",
        show_default=False, rich_help_panel="Plan")] = None,
    max_nproc: Annotated[Optional[int], typer.Option(
        help="The most processes to consider. \\[default: this machine's cores]",
        show_default=False, rich_help_panel="Plan")] = None,
    budget: Annotated[float, typer.Option(
        help="Seconds the calibration run (ddp x2 at the configured batch) may train to reach "
             "the target.", rich_help_panel="Plan")] = 30.0,
    constants: Annotated[Optional[Path], typer.Option(
        help="Reuse the cost-model constants of an earlier plan on this machine (its plan.json "
             "or folder) instead of timing updates. \\[default: measure]", show_default=False,
        rich_help_panel="Plan")] = None,
) -> None:
    """Declares the plan's own options; never called."""


PLAN_HELPS = {
    "out": Annotated[Optional[str], _opt("Plan folder: plan.json, the calibration run and its "
                                         "log.", "runs/plan-<timestamp>", TRAIN)],
    "force": Annotated[bool, typer.Option("--force", help="Replace a plan in --out.",
                                          rich_help_panel=TRAIN)],
    "epochs": Annotated[Optional[int], _opt(
        "Without --target-accuracy: the target is the validation accuracy these epochs reach at "
        "the configured batch (the calibration run trains them).", 25)],
    "threads": Annotated[Optional[int], _opt(
        "Intra-op threads per process, timed and recommended; 0 = 1 (the cost model's).", 1,
        SYSTEM)],
}
# Flags of a training run that plan cannot honour: its runs are measurements, without
# checkpoints, and it predicts a constant lr after the warmup.
PLAN_REFUSES = {
    "resume": "--resume continues a training run; plan starts none to continue",
    "checkpoint_every": "--checkpoint-every: plan's runs write no checkpoints",
    "keep": "--keep: plan's runs write no checkpoints",
    "keep_best": "--keep-best: plan's runs write no checkpoints",
}


def plan(target_accuracy: float | None, max_nproc: int | None, budget: float,
         constants: Path | None, **flags) -> None:
    from dptrain.study.plan import PLAN_JSON, make_plan, plan_table

    refused = [line for key, line in PLAN_REFUSES.items() if flags.get(key)]
    if refused:
        raise UserError("; ".join(refused))
    if target_accuracy is not None and flags.get("epochs") is not None:
        raise UserError("--target-accuracy and --epochs both set the target; pass one of them")
    if target_accuracy is not None and not 0 < target_accuracy < 1:
        raise UserError(f"--target-accuracy {target_accuracy}: expected a fraction between 0 "
                        "and 1, e.g. 0.95")
    if max_nproc is not None and max_nproc < 1:
        raise UserError(f"--max-nproc {max_nproc}: expected at least 1 process")
    if not budget > 0:
        raise UserError(f"--budget {budget:g}: expected a positive number of seconds")
    config = config_from_flags(flags)
    if config.optim.lr_schedule != "constant":
        raise UserError(f"--lr-schedule {config.optim.lr_schedule}: plan predicts a constant lr "
                        "after the warmup (a schedule over the epochs changes with them); plan "
                        "without it, then add it to the command plan recommends")
    out = Path(flags["out"]) if flags.get("out") else default_out_dir("plan")
    if (out / PLAN_JSON).exists() and not flags["force"]:
        raise UserError(f"--out {out} already holds a plan ({PLAN_JSON}); choose another "
                        "folder, or pass --force to replace it")
    console = make_console(highlight=False)
    result = make_plan(config, target=target_accuracy, max_nproc=max_nproc, budget=budget,
                       out=out, constants_from=constants, echo=console.print)
    console.print(plan_table(result))
    best = result["recommendation"]
    console.print(f"run: [bold]{best['command']}[/]", soft_wrap=True)  # one line, to copy
    console.print(f"  {best['reason']}")
    seconds = result["seconds"]
    console.print(f"plan took {seconds['total']:.1f} s (timing {seconds['constants']:.1f} s, "
                  f"calibration {seconds['calibration']:.1f} s); {out / PLAN_JSON}")


def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders to draw on one figure.")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("plot.png"),
    breakdown: Annotated[bool, typer.Option(
        "--breakdown", help="Draw where each run's time goes (a stacked bar of its phases per "
                            "epoch) instead of its curves.")] = False,
) -> None:
    from dptrain.study.plots import plot_runs

    print(f"wrote {plot_runs(run_dirs, out, breakdown=breakdown)}")


def report(
    sweep_dir: Annotated[Path, typer.Argument(help="A folder written by `dptrain sweep`.")],
) -> None:
    from dptrain.study.plots import report as draw

    for path in draw(sweep_dir):
        print(f"wrote {path}")


# What evaluate and predict take (inference/evaluate.py: load).
SOURCE_HELP = ("A finished run folder (its model.pt); a run still training (its newest "
               "checkpoint); a checkpoint folder, RUN/checkpoints/epoch-NNNN or "
               "RUN/checkpoints/best (--keep-best); or a model.pt file (dptrain export).")
ACTIVATION_HELP = ("relu|sigmoid|tanh: the activation of a model.pt that has no run's "
                   "config.toml beside it (an exported one). Its layer widths are read from its "
                   "tensors, the activation cannot be; a run or checkpoint names its own.")


def matrix(
    sweep_dirs: Annotated[list[Path], typer.Argument(
        help="Folders written by `dptrain sweep`: the knobs' runs, their seq references and "
             "the seq runs of the seed band (e.g. a seq sweep with --vary seed=0,1,2,3,4).")],
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for matrix.csv, matrix.md and matrix.png. \\[default: the first sweep's]",
        show_default=False)] = None,
) -> None:
    from dptrain.study.matrix import build_matrix, load_runs, markdown, write_matrix

    rows = build_matrix(load_runs(sweep_dirs))
    print(markdown(rows), end="")
    for path in write_matrix(rows, out or sweep_dirs[0]):
        print(f"wrote {path}")


def evaluate(
    model: Annotated[Path, typer.Argument(help=SOURCE_HELP)],
    confusion_png: Annotated[Optional[Path], typer.Option(
        help="Also save the confusion matrix as this PNG.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(
        help="MNIST folder (else the run's data_dir, $DPTRAIN_DATA_DIR, the cache).")] = None,
    activation: Annotated[Optional[str], typer.Option(help=ACTIVATION_HELP,
                                                      show_default=False)] = None,
) -> None:
    from dptrain.inference.evaluate import evaluate_run, print_evaluation

    result = evaluate_run(model, data_dir, activation)
    print_evaluation(result)
    if confusion_png is not None:
        from dptrain.inference.evaluate import save_confusion_png

        print(f"wrote {save_confusion_png(result, confusion_png)}")


def predict(
    model: Annotated[Path, typer.Argument(help=SOURCE_HELP)],
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files of single digits.")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per file, one per line, in order: {\"file\", "
                       "\"digit\", \"probabilities\" (10, digits 0-9)}, or {\"file\", "
                       "\"error\"}.")] = False,
    activation: Annotated[Optional[str], typer.Option(help=ACTIVATION_HELP,
                                                      show_default=False)] = None,
) -> None:
    from dptrain.inference.evaluate import predict_files

    if not predict_files(model, images, as_json=as_json, activation=activation):
        raise typer.Exit(USER_ERROR_EXIT)


def register(app: typer.Typer) -> None:
    app.command("sweep", cls=Command,
                help="Train once per mode and process count (plus a seq reference), in every "
                     "cell of the --vary keys; write sweep.csv and sweep.json. --resume "
                     "SWEEP_DIR continues an interrupted sweep.")(
        with_flags(_user_errors(sweep), sweep_flags, training_flags, process_group_flags,
                   ddp_flags, helps=SWEEP_HELPS))
    app.command("plan", cls=Command,
                help="Predict the fastest process count and global batch to reach a validation "
                     "accuracy on this machine: time a few updates, train one short calibration "
                     "run, print the table and the command to run; plan.json in --out.")(
        with_flags(_user_errors(plan), plan_flags, training_flags, process_group_flags,
                   helps=PLAN_HELPS))
    app.command("plot", cls=Command,
                help="Loss and validation accuracy curves of runs, as one PNG; a run still "
                     "training is drawn up to its last finished epoch. --breakdown: where their "
                     "time goes.")(_wrap(plot))
    app.command("report", cls=Command,
                help="The figures of a sweep, written into its folder.")(_wrap(report))
    app.command("matrix", cls=Command,
                help="What each knob changes: every run of the sweeps against its seq fp32 "
                     "reference (same global batch and seed): the largest parameter "
                     "difference and a verdict, the accuracy gap against the seed band, the "
                     "time and memory it costs.")(_wrap(matrix))
    app.command("evaluate", cls=Command, help="Test accuracy, per-class precision/recall and the "
                                              "confusion matrix of a trained model: a run's, a "
                                              "checkpoint's or a model.pt.")(_wrap(evaluate))
    app.command("predict", cls=Command,
                help="Predict the digit in your own images with a trained model: a run's, a "
                     "checkpoint's or a model.pt.")(_wrap(predict))


def _wrap(function):
    """_user_errors, keeping the function's signature for Typer."""
    import functools

    wrapped = _user_errors(function)
    functools.update_wrapper(wrapped, function)
    return wrapped
