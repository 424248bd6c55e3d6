"""The training flags, declared once and shared by `dptrain seq|ddp|fsdp`, `dptrain sweep` and
`dptrain.worker`; the process-group and launch flags only where they act (not seq).

Every option defaults to None ("not set"), so that the defaults live only in config.py and a
flag overrides the config file only when it is given.
"""

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from dptrain.config import (ACTIVATIONS, BACKENDS, BEST_METRICS, DECAYING, DEFAULT_PROFILE,
                            DEVICES, GRAD_SYNCS, LOSSES, LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS,
                            POWERSGD_RANK, PRECISIONS, START_METHODS, Config, ConfigError)

_DEFAULTS = Config()
TRAIN = "Training"
SYSTEM = "System"
LAUNCH = "Launch (torchrun)"
CHECKPOINT = "Checkpoints"
TELEMETRY = "Where the time goes"
DDP = "DDP knobs (change the result or the memory; docs/DESIGN.md)"
# Under each training command's description in --help.
DEFAULTS_NOTE = ("Defaults shown are the built-in ones; a --config file may change them, and "
                 "flags override both.")


def _opt(help: str, default: Any = None, panel: str = TRAIN, *names: str, **options) -> Any:
    """An option that shows its built-in default as Typer shows a default, since the option's
    own default is None ("not set": the defaults live in config.py, and a --config file may
    replace them)."""
    shown = f" [dim]{escape(f'[default: {default}]')}[/]" if default not in (None, "") else ""
    return typer.Option(*names, help=help + shown, rich_help_panel=panel, show_default=False,
                        **options)


def training_flags(
    config: Annotated[Optional[Path], _opt(
        "TOML config file: its values replace the built-in defaults; flags override it.",
        "none", TRAIN, "--config", "-c")] = None,
    epochs: Annotated[Optional[int], _opt("Passes over the train split.", _DEFAULTS.train.epochs)] = None,
    batch_size: Annotated[Optional[int], _opt(
        "Global batch: samples per update, summed over all ranks.", _DEFAULTS.train.batch_size)] = None,
    full_batch: Annotated[Optional[bool], _opt(
        "The whole train split (42,000) as one batch: one update per epoch, as in the seed study.",
        "off", TRAIN, "--full-batch")] = None,
    drop_last: Annotated[Optional[bool], _opt(
        "Skip each epoch's short tail batch (--keep-last trains on it).", "drop-last", TRAIN,
        "--drop-last/--keep-last")] = None,
    lr: Annotated[Optional[float], _opt("Base learning rate.", _DEFAULTS.optim.lr)] = None,
    lr_scaling: Annotated[Optional[str], _opt(
        f"LR rule: {'|'.join(LR_SCALINGS)}. linear: lr*global_batch/ref; "
        "sqrt: lr*sqrt(global_batch/ref); seed: lr*(global_batch/world_size)/ref.", _DEFAULTS.optim.lr_scaling)] = None,
    ref_batch_size: Annotated[Optional[int], _opt(
        "Reference batch of the LR rule.", _DEFAULTS.optim.ref_batch_size)] = None,
    warmup_epochs: Annotated[Optional[int], _opt(
        "Ramp the lr linearly from the base to the scaled lr over these epochs.",
        _DEFAULTS.optim.warmup_epochs)] = None,
    lr_schedule: Annotated[Optional[str], _opt(
        f"{'|'.join(LR_SCHEDULES)}: the lr after the warmup, update by update. cosine, linear: "
        "from the scaled lr down to --lr-final-fraction of it at the end of the run; step: x "
        "--lr-step-factor every --lr-step-epochs epochs.", _DEFAULTS.optim.lr_schedule)] = None,
    lr_final_fraction: Annotated[Optional[float], _opt(
        "cosine, linear: the lr at the end of the run, as a fraction of the scaled lr.",
        _DEFAULTS.optim.lr_final_fraction)] = None,
    lr_step_epochs: Annotated[Optional[int], _opt(
        "step: epochs between two steps down (counted from the warmup's end).",
        _DEFAULTS.optim.lr_step_epochs)] = None,
    lr_step_factor: Annotated[Optional[float], _opt(
        "step: what each step multiplies the lr by.", _DEFAULTS.optim.lr_step_factor)] = None,
    clip_grad_norm: Annotated[Optional[float], _opt(
        "Scale the gradient down to this L2 norm when it is larger (the norm over all ranks' "
        "summed gradient, as seq's); 0 = no clipping.", _DEFAULTS.optim.clip_grad_norm)] = None,
    optimizer: Annotated[Optional[str], _opt(
        f"{'|'.join(OPTIMIZERS)}.", _DEFAULTS.optim.optimizer)] = None,
    momentum: Annotated[Optional[float], _opt("SGD momentum.", _DEFAULTS.optim.momentum)] = None,
    weight_decay: Annotated[Optional[float], _opt("Weight decay.", _DEFAULTS.optim.weight_decay)] = None,
    loss: Annotated[Optional[str], _opt(f"{'|'.join(LOSSES)}.", _DEFAULTS.train.loss)] = None,
    activation: Annotated[Optional[str], _opt(
        f"{'|'.join(ACTIVATIONS)}.", _DEFAULTS.model.activation)] = None,
    hidden: Annotated[Optional[str], _opt(
        "Hidden layer sizes, comma-separated.", ",".join(map(str, _DEFAULTS.model.hidden)))] = None,
    seed: Annotated[Optional[int], _opt("Seed of the initial weights and the shuffle.",
                                        _DEFAULTS.train.seed)] = None,
    split_seed: Annotated[Optional[int], _opt("Seed of the 60/20/20 train/val/test split.",
                                              _DEFAULTS.data.split_seed)] = None,
    eval_batch_size: Annotated[Optional[int], _opt("Samples per forward pass in evaluation.",
                                                   _DEFAULTS.train.eval_batch_size)] = None,
    early_stop: Annotated[Optional[int], _opt(
        "Stop after K epochs without a better --best-metric (then test as usual); 0 = never.",
        _DEFAULTS.train.early_stop)] = None,
    best_metric: Annotated[Optional[str], _opt(
        f"{'|'.join(BEST_METRICS)}: what makes an epoch better, for --early-stop and "
        "--keep-best.", _DEFAULTS.train.best_metric)] = None,
    accumulate: Annotated[Optional[int], _opt(
        "Run each rank's share of a global batch as K micro-batches, summing their gradients "
        "before the one sum over ranks: the same update in a K-th of the activation memory.",
        _DEFAULTS.train.accumulate)] = None,
    precision: Annotated[Optional[str], _opt(
        f"{'|'.join(PRECISIONS)}. bf16: forward and backward passes (evaluation's too) under "
        "autocast, weights and optimizer state in float32; fsdp gathers bf16 parameters and "
        "sums gradients in float32.", _DEFAULTS.train.precision)] = None,
    data_dir: Annotated[Optional[str], _opt(
        "Folder with the four MNIST files.", "$DPTRAIN_DATA_DIR, else the download cache")] = None,
    out: Annotated[Optional[str], _opt("Run folder.", "runs/<mode>-<timestamp>")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a finished run in --out.",
                                        rich_help_panel=TRAIN)] = False,
    checkpoint_every: Annotated[Optional[int], _opt(
        "Write a checkpoint every K epochs (and after the last); 0 = never.",
        _DEFAULTS.run.checkpoint_every, CHECKPOINT)] = None,
    keep: Annotated[Optional[int], _opt("Checkpoints kept: the newest K.", _DEFAULTS.run.keep,
                                        CHECKPOINT)] = None,
    keep_best: Annotated[Optional[bool], _opt(
        "Also keep the checkpoint of the best epoch (--best-metric) in checkpoints/best/, apart "
        "from the --keep rotation (written whenever an epoch is better).", "off", CHECKPOINT,
        "--keep-best")] = None,
    resume: Annotated[Optional[str], _opt(
        "Continue RUN_DIR from its newest complete checkpoint; 'auto': continue --out if it has "
        "one, else start it.", "a fresh start", CHECKPOINT, "--resume")] = None,
    device: Annotated[Optional[str], _opt(f"{'|'.join(DEVICES)}; auto = cuda if available.",
                                          _DEFAULTS.system.device, SYSTEM)] = None,
    threads: Annotated[Optional[int], _opt(
        "Intra-op threads per rank. 0 = auto: 1 for a model and batch too small to split (the "
        "default model's), else this rank's share of the cores that are free.",
        f"{_DEFAULTS.system.threads} (auto)", SYSTEM)] = None,
    phase_times: Annotated[Optional[bool], _opt(
        "Time the phases of every update on every rank (batch, forward/backward, gradient sum, "
        "waiting for peers, optimizer) into metrics.jsonl and summary.json.", "phase-times",
        TELEMETRY, "--phase-times/--no-phase-times")] = None,
    noise_scale: Annotated[Optional[bool], _opt(
        "Measure the gradient noise scale (what dptrain plan predicts from) in ddp and fsdp "
        "runs of 2+ ranks and with --accumulate 2+, into metrics.jsonl and summary.json.",
        "noise-scale", TELEMETRY, "--noise-scale/--no-noise-scale")] = None,
    noise_every: Annotated[Optional[int], _opt(
        "Read the noise scale at one update in K (the last of every K in an epoch): fewer reads "
        "cost less (ddp x 2 of the default model: 2.2% of an epoch at 4, 4.3% at 1) and give a "
        "larger standard error (2-3x at 4).", str(_DEFAULTS.run.noise_every), TELEMETRY)] = None,
    profile: Annotated[Optional[str], _opt(
        "Record updates START+1 to START+COUNT of the run (over all epochs) with torch.profiler: "
        f"one Chrome trace per rank in RUN/profile/. --profile alone: {DEFAULT_PROFILE}.", "off",
        TELEMETRY, "--profile", metavar="[START:COUNT]")] = None,
    tensorboard: Annotated[Optional[bool], _opt(
        "Write TensorBoard event files into RUN/tensorboard/: the per-epoch metrics and phases, "
        'the config (needs pip install -e ".\\[tensorboard]").', "off", TELEMETRY,
        "--tensorboard")] = None,
) -> None:
    """Declares the options of every training command (seq included); never called."""


def process_group_flags(
    backend: Annotated[Optional[str], _opt(
        f"{'|'.join(BACKENDS)}; auto = nccl on cuda, gloo on cpu.", _DEFAULTS.system.backend,
        SYSTEM)] = None,
    timeout: Annotated[Optional[float], _opt(
        "Seconds a collective waits for a peer before the job fails. A hung worker then gets "
        "5 s to end (SIGTERM) before it is killed ($TORCH_ELASTIC_SHUTDOWN_TIMEOUT).",
        _DEFAULTS.system.timeout,
        SYSTEM)] = None,
    grad_sync: Annotated[Optional[str], _opt(
        f"{'|'.join(GRAD_SYNCS)}: how ddp sums gradients. shm = through shared memory (CPU ranks "
        "of one x86-64 node; 4.6-12.6x faster than gloo's all_reduce in docs/STUDY.md); auto = shm "
        "where it applies (fsdp always uses the collective).", _DEFAULTS.system.grad_sync, SYSTEM)] = None,
) -> None:
    """Declares the options of the process group (ddp, fsdp and the worker; not seq, which has
    none); never called."""


def ddp_flags(
    grad_compress: Annotated[Optional[str], _opt(
        "none|fp16|bf16|powersgd[:RANK]: what the gradient sum sends. fp16/bf16: each rank's "
        "gradients cast, summed in that type; powersgd: torch's PowerSGD (factors of rank "
        f"RANK, {POWERSGD_RANK} if not given; error feedback) after --powersgd-warmup plain "
        "sums. Sums through the process group (not --grad-sync shm).",
        _DEFAULTS.ddp.grad_compress, DDP)] = None,
    powersgd_warmup: Annotated[Optional[int], _opt(
        "Updates with the plain sum before PowerSGD compresses (>= 2).",
        _DEFAULTS.ddp.powersgd_warmup, DDP)] = None,
    local_sgd: Annotated[Optional[int], _opt(
        "Post-local SGD: after --local-sgd-warmup updates, each rank steps on its own "
        "gradients and the parameters are averaged every K updates (and at each epoch's "
        "end); 0 = off.", _DEFAULTS.ddp.local_sgd, DDP)] = None,
    local_sgd_warmup: Annotated[Optional[int], _opt(
        "Ordinary updates (gradients summed) before local SGD starts.",
        _DEFAULTS.ddp.local_sgd_warmup, DDP)] = None,
    zero: Annotated[Optional[bool], _opt(
        "ZeRO stage 1 (torch's ZeroRedundancyOptimizer): each rank holds the optimizer state "
        "of its share of the parameter tensors (about 1/N); the same parameters as without "
        "(so it may change on --resume).", "no-zero", DDP, "--zero/--no-zero")] = None,
) -> None:
    """Declares ddp's own knobs (ddp, the worker and the sweep); never called."""


def launch_flags(
    nproc: Annotated[Optional[int], _opt("Worker processes per node.", _DEFAULTS.launch.nproc,
                                         LAUNCH)] = None,
    nnodes: Annotated[Optional[int], _opt("Nodes in the job.", _DEFAULTS.launch.nnodes, LAUNCH)] = None,
    node_rank: Annotated[Optional[int], _opt(
        "This node's rank (used by the static rendezvous).", _DEFAULTS.launch.node_rank, LAUNCH)] = None,
    rdzv_endpoint: Annotated[Optional[str], _opt(
        "HOST:PORT of the rendezvous (multi-node).", "a free local port", LAUNCH)] = None,
    rdzv_id: Annotated[Optional[str], _opt("Job id shared by all nodes (multi-node).", "none",
                                           LAUNCH)] = None,
    rdzv_backend: Annotated[Optional[str], _opt(
        "c10d|static (multi-node).", _DEFAULTS.launch.rdzv_backend, LAUNCH)] = None,
    max_restarts: Annotated[Optional[int], _opt(
        "Restart all workers up to K times after a failure; they resume from the newest "
        "checkpoint.", _DEFAULTS.launch.max_restarts, LAUNCH)] = None,
    start_method: Annotated[Optional[str], _opt(
        f"{'|'.join(START_METHODS)}: fork the workers from this process (it imports torch once "
        "for all) or start fresh ones; auto = fork for CPU runs, fresh for CUDA.",
        _DEFAULTS.launch.start_method, LAUNCH)] = None,
) -> None:
    """Declares the torchrun options of ddp and fsdp; never called."""


# Options whose value may be left out (Typer has none): given alone, they get this value.
OPTIONAL_VALUES = {"--profile": DEFAULT_PROFILE}


def fill_optional_values(argv: list[str]) -> list[str]:
    """argv with `--profile` given alone (last, or before another option) as --profile=1:5."""
    filled = list(argv)
    for i, arg in enumerate(argv):
        alone = i + 1 == len(argv) or argv[i + 1].startswith("-")
        if arg in OPTIONAL_VALUES and alone:
            filled[i] = f"{arg}={OPTIONAL_VALUES[arg]}"
    return filled


def option_names(*declarations: Callable) -> set[str]:
    """The flags `declarations` declare, as typed: {'--nproc', '--rdzv-id', ...}."""
    return {"--" + p.name.replace("_", "-") for p in parameters(*declarations)}


def _untag_flags(params: list) -> list:
    """Typer's usual --help: no type tag on an on/off flag (`--help`, `--force`, `--full-batch`);
    other options keep theirs (<int>, <float>, ...)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A dptrain command: its flags as Typer usually shows them (_untag_flags)."""

    def get_params(self, ctx) -> list:
        return _untag_flags(super().get_params(ctx))


class Group(TyperGroup):
    """The `dptrain` group: its own --help as Typer usually shows it (_untag_flags)."""

    def get_params(self, ctx) -> list:
        return _untag_flags(super().get_params(ctx))


def parameters(*declarations: Callable) -> list[inspect.Parameter]:
    return [p for d in declarations for p in inspect.signature(d).parameters.values()]


def with_flags(function: Callable, *declarations: Callable,
               helps: dict[str, Any] | None = None) -> Callable:
    """Give `function(**flags)` the options of `declarations` as its signature, for Typer;
    `helps` replaces some options' declarations (name -> Annotated type), where a command
    reads them otherwise (a sweep's --out, --resume, --threads)."""
    function.__signature__ = inspect.Signature(
        [p.replace(annotation=(helps or {}).get(p.name, p.annotation))
         for p in parameters(*declarations)])
    return function


# Flags that are not config keys.
NOT_CONFIG = {"config", "force", "resume"}


def config_from_flags(flags: dict[str, Any], base: dict[str, dict] | None = None) -> Config:
    """defaults < `base` (a config tree, e.g. a checkpoint's) < --config file < the given flags."""
    from dptrain.config import build_config

    path = flags.get("config")
    file_values = {section: dict(values) for section, values in (base or {}).items()}
    for section, values in (_file_values(Path(path)) if path else {}).items():
        if isinstance(values, dict) and isinstance(file_values.get(section), dict):
            file_values[section].update(values)
        else:
            file_values[section] = values
    values = {k: v for k, v in flags.items() if k not in NOT_CONFIG}
    if values.get("hidden") is not None:
        values["hidden"] = parse_sizes(values["hidden"])
    config = build_config(file_values, values, source=str(path) if path else "config")
    unused = unused_flags({k for k, v in values.items() if v is not None}, config)
    if unused:
        raise ConfigError("; ".join(unused))
    if config.run.tensorboard:  # before any process starts: one line naming the extra
        from dptrain.telemetry.board import require_tensorboard

        require_tensorboard()
    return config


def _file_values(path: Path) -> dict[str, Any]:
    """A --config file's values, without an `out` that names the file's own folder: a run's
    config.toml from before `out` was left out of it must not aim a new run at that run."""
    from dptrain.config import read_toml

    values = read_toml(path)
    run = values.get("run")
    if isinstance(run, dict) and isinstance(run.get("out"), str) and run["out"] \
            and Path(run["out"]).resolve() == path.resolve().parent:
        values["run"] = {k: v for k, v in run.items() if k != "out"}
    return values


def unused_flags(given: set[str], c: Config) -> list[str]:
    """Flags given on the command line that this config would silently not use.

    Only flags: a config file carries every key (a run's config.toml, say), used or not.
    """
    rules = [
        ("batch_size", c.train.full_batch,
         "--batch-size is not used with --full-batch (the whole train split is the batch)"),
        ("keep", c.run.checkpoint_every == 0,
         "--keep is not used with --checkpoint-every 0 (no checkpoints are written)"),
        ("powersgd_warmup", not c.ddp.grad_compress.startswith("powersgd"),
         "--powersgd-warmup is not used without --grad-compress powersgd"),
        ("local_sgd_warmup", not c.ddp.local_sgd,
         "--local-sgd-warmup is not used without --local-sgd K"),
        ("ref_batch_size", c.optim.lr_scaling == "none",
         "--ref-batch-size is not used with lr_scaling none; choose an --lr-scaling rule"),
        # A flag only: a sweep that crosses rules with warmups, or a config file, may hold it.
        ("warmup_epochs", c.optim.warmup_epochs and c.optim.lr_scaling == "none",
         "--warmup-epochs is not used with lr_scaling none (the warmup ramps from the base lr "
         "to the scaled lr, which none leaves equal); choose an --lr-scaling rule"),
        ("lr_final_fraction", c.optim.lr_schedule not in DECAYING,
         "--lr-final-fraction is used by the cosine and linear schedules only; choose one with "
         "--lr-schedule"),
        ("lr_step_epochs", c.optim.lr_schedule != "step",
         "--lr-step-epochs is used by --lr-schedule step only"),
        ("lr_step_factor", c.optim.lr_schedule != "step",
         "--lr-step-factor is used by --lr-schedule step only"),
        ("best_metric", not (c.train.early_stop or c.run.keep_best),
         "--best-metric is not used without --early-stop or --keep-best"),
    ]
    return [message for key, applies, message in rules if key in given and applies]


def parse_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--hidden: expected comma-separated integers such as 16,16, "
                          f"got {text!r}") from None
