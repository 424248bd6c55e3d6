"""The training flags, declared once and shared by `dptrain seq|ddp|fsdp` and `dptrain.worker`.

Every option defaults to None ("not set"), so that the defaults live only in config.py and a
flag overrides the config file only when it is given.
"""

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from dptrain.config import (ACTIVATIONS, BACKENDS, DEVICES, GRAD_SYNCS, LOSSES, LR_SCALINGS,
                            OPTIMIZERS, Config, ConfigError)

_DEFAULTS = Config()
TRAIN = "Training"
SYSTEM = "System"
LAUNCH = "Launch (torchrun)"
CHECKPOINT = "Checkpoints"


def _opt(help: str, default: Any = None, panel: str = TRAIN, *names: str) -> Any:
    """An option that shows the built-in default in its help, since its own default is None."""
    shown = f" [default: {default}]" if default not in (None, "") else ""
    return typer.Option(*names, help=help + shown, rich_help_panel=panel, show_default=False)


def training_flags(
    config: Annotated[Optional[Path], _opt("TOML config file; flags override it", None, TRAIN,
                                           "--config", "-c")] = None,
    epochs: Annotated[Optional[int], _opt("Passes over the train split.", _DEFAULTS.train.epochs)] = None,
    batch_size: Annotated[Optional[int], _opt(
        "Global batch: samples per update, summed over all ranks.", _DEFAULTS.train.batch_size)] = None,
    full_batch: Annotated[Optional[bool], _opt(
        "The whole train split (42,000) as one batch: one update per epoch, as in the seed study.",
        None, TRAIN, "--full-batch")] = None,
    drop_last: Annotated[Optional[bool], _opt(
        "Skip each epoch's short tail batch (--keep-last trains on it).", "drop", TRAIN,
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
    data_dir: Annotated[Optional[str], _opt(
        "Folder with the four MNIST files (else $DPTRAIN_DATA_DIR, else the download cache).")] = None,
    out: Annotated[Optional[str], _opt("Run folder.", "runs/<mode>-<timestamp>")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a finished run in --out.",
                                        rich_help_panel=TRAIN)] = False,
    checkpoint_every: Annotated[Optional[int], _opt(
        "Write a checkpoint every K epochs (and after the last); 0 = never.",
        _DEFAULTS.run.checkpoint_every, CHECKPOINT)] = None,
    keep: Annotated[Optional[int], _opt("Checkpoints kept: the newest K.", _DEFAULTS.run.keep,
                                        CHECKPOINT)] = None,
    resume: Annotated[Optional[str], _opt(
        "Continue RUN_DIR from its newest complete checkpoint; 'auto': continue --out if it has "
        "one, else start it.", None, CHECKPOINT, "--resume")] = None,
    device: Annotated[Optional[str], _opt(f"{'|'.join(DEVICES)}; auto = cuda if available.",
                                          _DEFAULTS.system.device, SYSTEM)] = None,
    backend: Annotated[Optional[str], _opt(
        f"{'|'.join(BACKENDS)}; auto = nccl on cuda, gloo on cpu.", _DEFAULTS.system.backend,
        SYSTEM)] = None,
    threads: Annotated[Optional[int], _opt(
        "Intra-op threads per rank; 0 = cores // processes per node.", _DEFAULTS.system.threads,
        SYSTEM)] = None,
    timeout: Annotated[Optional[float], _opt(
        "Seconds a collective waits for a peer before the job fails.", _DEFAULTS.system.timeout,
        SYSTEM)] = None,
    grad_sync: Annotated[Optional[str], _opt(
        f"{'|'.join(GRAD_SYNCS)}: how ddp sums gradients. shm = through shared memory (CPU ranks "
        "of one x86-64 node, ~50x faster than a gloo all_reduce); auto = shm where it applies.",
        _DEFAULTS.system.grad_sync, SYSTEM)] = None,
) -> None:
    """Declares the shared options; never called."""


def launch_flags(
    nproc: Annotated[Optional[int], _opt("Worker processes per node.", _DEFAULTS.launch.nproc,
                                         LAUNCH)] = None,
    nnodes: Annotated[Optional[int], _opt("Nodes in the job.", _DEFAULTS.launch.nnodes, LAUNCH)] = None,
    node_rank: Annotated[Optional[int], _opt(
        "This node's rank (used by the static rendezvous).", _DEFAULTS.launch.node_rank, LAUNCH)] = None,
    rdzv_endpoint: Annotated[Optional[str], _opt(
        "HOST:PORT of the rendezvous (multi-node); single node uses a free local port.", None,
        LAUNCH)] = None,
    rdzv_id: Annotated[Optional[str], _opt("Job id shared by all nodes.", None, LAUNCH)] = None,
    rdzv_backend: Annotated[Optional[str], _opt(
        "c10d|static.", _DEFAULTS.launch.rdzv_backend, LAUNCH)] = None,
    max_restarts: Annotated[Optional[int], _opt(
        "Restart all workers up to K times after a failure; they resume from the newest "
        "checkpoint.", _DEFAULTS.launch.max_restarts, LAUNCH)] = None,
) -> None:
    """Declares the torchrun options of ddp and fsdp; never called."""


def parameters(*declarations: Callable) -> list[inspect.Parameter]:
    return [p for d in declarations for p in inspect.signature(d).parameters.values()]


def with_flags(function: Callable, *declarations: Callable) -> Callable:
    """Give `function(**flags)` the options of `declarations` as its signature, for Typer."""
    function.__signature__ = inspect.Signature(parameters(*declarations))
    return function


# Flags that are not config keys.
NOT_CONFIG = {"config", "force", "resume"}


def config_from_flags(flags: dict[str, Any], base: dict[str, dict] | None = None) -> Config:
    """defaults < `base` (a config tree, e.g. a checkpoint's) < --config file < the given flags."""
    from dptrain.config import build_config, read_toml

    path = flags.get("config")
    file_values = {section: dict(values) for section, values in (base or {}).items()}
    for section, values in (read_toml(path) if path else {}).items():
        if isinstance(values, dict) and isinstance(file_values.get(section), dict):
            file_values[section].update(values)
        else:
            file_values[section] = values
    values = {k: v for k, v in flags.items() if k not in NOT_CONFIG}
    if values.get("hidden") is not None:
        values["hidden"] = parse_sizes(values["hidden"])
    return build_config(file_values, values, source=str(path) if path else "config")


def parse_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--hidden: expected comma-separated integers such as 16,16, "
                          f"got {text!r}") from None
