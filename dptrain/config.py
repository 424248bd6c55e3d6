"""The configuration: one tree of dataclasses, defaults < TOML file < flags, and the LR rule.

Nothing here imports torch: the CLI validates a whole config before it starts any process.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dptrain.errors import UserError

MODES = ("seq", "ddp", "fsdp")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("adam", "sgd")
LR_SCALINGS = ("none", "linear", "sqrt", "seed")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
RDZV_BACKENDS = ("c10d", "static")
GRAD_SYNCS = ("auto", "collective", "shm")
START_METHODS = ("auto", "fork", "fresh")
GRAD_COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")  # powersgd[:RANK]
LR_SCHEDULES = ("constant", "cosine", "linear", "step")
DECAYING = ("cosine", "linear")  # the schedules whose shape depends on the run's length
BEST_METRICS = ("val_accuracy", "val_loss")
PRECISIONS = ("fp32", "bf16")

# --profile START:COUNT: skip START updates of the run, then record COUNT (>= 1).
PROFILE_WINDOW = re.compile(r"\d+:0*[1-9]\d*")
# --profile alone: skip the first update, which pays first touches, and record five.
DEFAULT_PROFILE = "1:5"

# Output-only section of a run's config.toml; ignored when that file is read back as --config.
RESOLVED_SECTION = "resolved"
# What a config file may be: far more than any config needs ([section] / key / hidden list: 3).
CONFIG_BYTES, CONFIG_DEPTH = 1 << 20, 8
# The longest --timeout: a week. timedelta overflows at ~1e14 s, and an inf one is no timeout.
MAX_TIMEOUT = 7 * 24 * 3600.0


class ConfigError(UserError):
    """A config file or flag the user must fix."""


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (16, 16)
    activation: str = "relu"


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    data_dir: str = ""  # "" = $DPTRAIN_DATA_DIR, then the cache (downloading if needed)
    split_seed: int = 0  # the 60/20/20 split; fixed so that every run sees the same split


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_scaling: str = "none"
    ref_batch_size: int = 1024
    warmup_epochs: int = 0
    # After the warmup, the lr (the scaled one) follows this schedule, update by update.
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.0  # cosine, linear: the lr they reach at the last update, x lr
    lr_step_epochs: int = 10  # step: the lr is multiplied by lr_step_factor every K epochs
    lr_step_factor: float = 0.1
    clip_grad_norm: float = 0.0  # clip the gradient to this global L2 norm; 0 = no clipping


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size: int = 1024  # the global batch, summed over all ranks
    full_batch: bool = False  # the seed study's setup: the whole train split is one batch
    # Skip each epoch's short tail batch (16 samples at 1024). With Adam a 16-sample step is as
    # large as a full one but far noisier: keeping it cost about 1.5 points of test accuracy.
    drop_last: bool = True
    loss: str = "cross_entropy"
    seed: int = 0  # model init and the per-epoch shuffle
    # Small enough to stay in cache: 8192 was no faster, and held ~25 MB more per process.
    eval_batch_size: int = 1024
    early_stop: int = 0  # stop after K epochs without a better best_metric; 0 = never
    best_metric: str = "val_accuracy"  # what "better" means for early_stop and keep_best
    # Micro-batches per rank per update, their gradients summed before the one sum over ranks:
    # the same update, with a K-th of the activation memory.
    accumulate: int = 1
    # bf16: forward and backward under torch.autocast, weights and optimizer state in float32.
    precision: str = "fp32"


@dataclass(kw_only=True, frozen=True)
class SystemConfig:
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0  # intra-op threads per rank; 0 = from the work and the free cores
    timeout: float = 300.0  # seconds a collective may wait for a peer
    # How ddp sums gradients: the process group's all_reduce, or shared memory between the
    # ranks of one node (auto: shm for CPU ranks that all share one x86-64 node).
    grad_sync: str = "auto"


@dataclass(kw_only=True, frozen=True)
class DDPConfig:
    """ddp's knobs that trade the exact sum for time or memory (docs/DESIGN.md, "How ddp sums
    gradients"); every other mode refuses them."""

    # What the gradient sum sends: none, fp16, bf16 (each rank's gradients cast, summed in that
    # type), or powersgd[:RANK] (torch's PowerSGD: low-rank factors, error feedback; rank 2).
    grad_compress: str = "none"
    # Plain sums before PowerSGD compresses (>= 2): about 2.4 epochs at the default batch, torch's
    # advice of ~10% of training. (Default model, rank 2: 2 updates ended 0.17 points above
    # seq, 100 updates 0.32 below; one seed each, both within the seeds' spread.)
    powersgd_warmup: int = 100
    # Post-local SGD: after local_sgd_warmup plain updates, each rank steps on its own and the
    # parameters are averaged every local_sgd updates (and at each epoch's end); 0 = off.
    local_sgd: int = 0
    # As PowerSGD's. (Default model, K = 4: warm-ups of 0 and 100 updates ended at test
    # accuracy 0.9454 and 0.9456, seq 0.9417.)
    local_sgd_warmup: int = 100
    zero: bool = False  # ZeRO stage 1: each rank keeps the optimizer state of 1/N of the model


@dataclass(kw_only=True, frozen=True)
class LaunchConfig:
    nproc: int = 2  # processes per node (ddp, fsdp)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # "" = localhost on a free port
    rdzv_id: str = ""
    rdzv_backend: str = "c10d"  # c10d: ranks assigned at rendezvous; static: by node_rank
    max_restarts: int = 0  # torchrun restarts all workers this often; they resume from a checkpoint
    # How the workers start: forked from the launcher, which has imported everything once, or
    # as fresh `python -m dptrain.worker` processes. auto: fork for CPU runs, fresh for CUDA
    # (a fork of CUDA workers is not yet measured on a GPU; see launch.worker_entry; where the
    # launcher had to ask CUDA itself, forked CUDA workers could not start: they start fresh).
    start_method: str = "auto"


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    out: str = ""  # "" = runs/<mode>-<timestamp>
    checkpoint_every: int = 1  # epochs between checkpoints; 0 = none
    keep: int = 2  # the newest checkpoints kept
    keep_best: bool = False  # also keep the best epoch's checkpoint (best_metric) in checkpoints/best/
    phase_times: bool = True  # time the phases of every update (telemetry/phases.py)
    noise_scale: bool = True  # the gradient noise scale, where an update has 2+ small batches
    # Read it at one update of every K (the last of each K in an epoch): at every update it
    # costs about 4.3% of a ddp x 2 epoch of the default model, at K = 4 about 2.2% (the 2-core VM,
    # benchmarks/noise_ab.py; docs/PERFORMANCE.md)
    noise_every: int = 4
    profile: str = ""  # "START:COUNT": torch.profiler over those updates; "" = off
    tensorboard: bool = False  # event files in RUN/tensorboard (the tensorboard extra)


@dataclass(kw_only=True, frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    system: SystemConfig = SystemConfig()
    ddp: DDPConfig = DDPConfig()
    launch: LaunchConfig = LaunchConfig()
    run: RunConfig = RunConfig()


def _section_types() -> dict[str, type]:
    return {f.name: f.default.__class__ for f in fields(Config)}


def section_of(key: str) -> str:
    """The section that holds a flag's key; every key name is unique across sections."""
    for section, cls in _section_types().items():
        if key in {f.name for f in fields(cls)}:
            return section
    raise KeyError(key)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a config file; a missing, malformed, oversized or too deeply nested file (or one
    that is not a regular file: a FIFO would block) is a ConfigError naming it."""
    from dptrain.storage.safeload import LoadError, nesting_depth, read_bounded

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = read_bounded(path, CONFIG_BYTES).decode()
        values = tomllib.loads(text)
    except LoadError as e:
        raise ConfigError(f"config file {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        values = None
    if values is None or nesting_depth(values) > CONFIG_DEPTH:
        raise ConfigError(f"config file {path} nests tables or lists more than {CONFIG_DEPTH} "
                          "levels deep; a config has sections of keys, hidden a list of sizes")
    return values


def build_config(file_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
                 *, source: str = "config") -> Config:
    """Merge defaults < file values (nested by section) < flags (flat key -> value), then validate.

    Flags whose value is None were not given. Every problem is reported in one ConfigError.
    """
    problems: list[str] = []
    merged = asdict(Config())
    for section, values in (file_values or {}).items():
        if section == RESOLVED_SECTION:
            continue
        if not isinstance(values, dict) or section not in merged:
            problems.append(f"{source}: {_misplaced(section, values, merged)}")
            continue
        for key, value in values.items():
            if key not in merged[section]:
                problems.append(f"{source}: unknown key '{section}.{key}'"
                                f"{_did_you_mean(key, section, merged)}")
            else:
                merged[section][key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            merged[section_of(key)][key] = value

    sections, checkable, mistyped = {}, {}, []
    for section, cls in _section_types().items():
        values, stand_ins = {}, {}
        for f in fields(cls):
            value, problem = _coerce(merged[section][f.name], f.default)
            if problem:
                problems.append(f"{section}.{f.name}: {problem}, got {value!r}")
                mistyped.append(f"{section}.{f.name}")
            values[f.name] = value
            stand_ins[f.name] = f.default if problem else value
        sections[section] = cls(**values)
        checkable[section] = cls(**stand_ins)
    # Range checks need well-typed values: a mistyped key is checked as its default, so that
    # the other keys' problems are reported in the same pass, and its own only once.
    problems += [p for p in validate(Config(**checkable))
                 if not p.startswith(tuple(f"{key}:" for key in mistyped))]
    if problems:
        raise ConfigError("; ".join(problems))
    return Config(**sections)


def _did_you_mean(key: str, section: str | None, known: dict[str, dict]) -> str:
    """'; did you mean ...?' for a misspelt key: its section's keys first, then any section's."""
    close = difflib.get_close_matches(key, known[section], n=1) if section else []
    if close:
        return f"; did you mean {close[0]}?"
    elsewhere = {k: s for s, keys in known.items() for k in keys}
    close = difflib.get_close_matches(key, elsewhere, n=1)
    return f"; did you mean {elsewhere[close[0]]}.{close[0]}?" if close else ""


def _misplaced(name: str, value: Any, known: dict[str, dict]) -> str:
    """What is wrong with a top-level TOML entry that is not one of the known sections."""
    if isinstance(value, dict):
        return f"unknown section [{name}] (known: {', '.join(known)})"
    if name in known:
        return f"[{name}] must be a section of keys, got {name} = {value!r}"
    home = next((section for section, keys in known.items() if name in keys), None)
    if home:
        return f"'{name}' belongs in section [{home}]: write it under a [{home}] line"
    return (f"unknown key '{name}' outside any section{_did_you_mean(name, None, known)} "
            f"(known sections: {', '.join(known)})")


def _coerce(value: Any, default: Any) -> tuple[Any, str | None]:
    """Check a value against the type of its default; ints are accepted where floats are."""
    if isinstance(default, bool):
        return value, None if isinstance(value, bool) else "expected true or false"
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else "expected an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value) if ok else value), None if ok else "expected a number"
    if isinstance(default, str):
        return value, None if isinstance(value, str) else "expected a string"
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        return (tuple(value) if ok else value), None if ok else "expected a list of integers"
    raise TypeError(f"no coercion for {type(default)}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"{name}: expected one of {', '.join(choices)}, got {value!r}"]


def validate(c: Config) -> list[str]:
    """Range and choice checks that need no knowledge of the world size or the data."""
    p = []
    if not c.model.hidden or any(h < 1 for h in c.model.hidden):
        p.append(f"model.hidden: expected one or more sizes >= 1, got {list(c.model.hidden)}")
    p += _choice("model.activation", c.model.activation, ACTIVATIONS)
    p += _choice("optim.optimizer", c.optim.optimizer, OPTIMIZERS)
    p += _choice("optim.lr_scaling", c.optim.lr_scaling, LR_SCALINGS)
    p += _choice("train.loss", c.train.loss, LOSSES)
    p += _choice("train.precision", c.train.precision, PRECISIONS)
    p += _choice("system.backend", c.system.backend, BACKENDS)
    p += _choice("system.device", c.system.device, DEVICES)
    p += _choice("system.grad_sync", c.system.grad_sync, GRAD_SYNCS)
    p += _choice("launch.rdzv_backend", c.launch.rdzv_backend, RDZV_BACKENDS)
    p += _choice("launch.start_method", c.launch.start_method, START_METHODS)
    p += _choice("optim.lr_schedule", c.optim.lr_schedule, LR_SCHEDULES)
    p += _choice("train.best_metric", c.train.best_metric, BEST_METRICS)
    checks = [
        ("optim.lr", c.optim.lr, c.optim.lr > 0 and math.isfinite(c.optim.lr), "> 0"),
        ("optim.momentum", c.optim.momentum, 0 <= c.optim.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", c.optim.weight_decay,
         0 <= c.optim.weight_decay < math.inf, ">= 0 and finite"),
        ("optim.ref_batch_size", c.optim.ref_batch_size, c.optim.ref_batch_size >= 1, ">= 1"),
        ("optim.warmup_epochs", c.optim.warmup_epochs, c.optim.warmup_epochs >= 0, ">= 0"),
        ("optim.lr_final_fraction", c.optim.lr_final_fraction,
         0 <= c.optim.lr_final_fraction <= 1, "in [0, 1]"),
        ("optim.lr_step_epochs", c.optim.lr_step_epochs, c.optim.lr_step_epochs >= 1, ">= 1"),
        ("optim.lr_step_factor", c.optim.lr_step_factor, 0 < c.optim.lr_step_factor <= 1,
         "in (0, 1]"),
        ("optim.clip_grad_norm", c.optim.clip_grad_norm,
         c.optim.clip_grad_norm >= 0 and math.isfinite(c.optim.clip_grad_norm),
         ">= 0 (0 = no clipping)"),
        ("train.epochs", c.train.epochs, c.train.epochs >= 1, ">= 1"),
        ("train.early_stop", c.train.early_stop, c.train.early_stop >= 0, ">= 0 (0 = never)"),
        ("train.batch_size", c.train.batch_size, c.train.batch_size >= 1, ">= 1"),
        ("train.eval_batch_size", c.train.eval_batch_size, c.train.eval_batch_size >= 1, ">= 1"),
        ("train.accumulate", c.train.accumulate, c.train.accumulate >= 1, ">= 1"),
        ("system.threads", c.system.threads, c.system.threads >= 0, ">= 0 (0 = automatic)"),
        ("system.timeout", c.system.timeout, 0 < c.system.timeout <= MAX_TIMEOUT,
         f"> 0 and at most {MAX_TIMEOUT:g} seconds (a week)"),
        ("launch.nproc", c.launch.nproc, c.launch.nproc >= 1, ">= 1"),
        ("launch.nnodes", c.launch.nnodes, c.launch.nnodes >= 1, ">= 1"),
        ("launch.max_restarts", c.launch.max_restarts, c.launch.max_restarts >= 0, ">= 0"),
        ("run.checkpoint_every", c.run.checkpoint_every, c.run.checkpoint_every >= 0,
         ">= 0 (0 = no checkpoints)"),
        ("run.keep", c.run.keep, c.run.keep >= 1, ">= 1"),
        ("run.noise_every", c.run.noise_every, c.run.noise_every >= 1, ">= 1"),
        ("launch.node_rank", c.launch.node_rank,
         0 <= c.launch.node_rank < max(c.launch.nnodes, 1), f"in [0, nnodes={c.launch.nnodes})"),
    ]
    p += [f"{name}: must be {rule}, got {value!r}" for name, value, ok, rule in checks if not ok]
    p += _ddp_problems(c.ddp)
    if c.optim.lr_schedule in DECAYING and c.optim.warmup_epochs >= c.train.epochs:
        p.append(f"optim.lr_schedule: {c.optim.lr_schedule} decays the lr after the warmup, but "
                 f"warmup_epochs {c.optim.warmup_epochs} leaves none of the {c.train.epochs} "
                 "epochs")
    if c.optim.optimizer == "adam" and c.optim.momentum:
        p.append("optim.momentum: only sgd uses momentum; adam has its own betas")
    if c.run.profile and not PROFILE_WINDOW.fullmatch(c.run.profile):
        p.append(f"run.profile: expected START:COUNT in updates, COUNT >= 1, such as 10:5, "
                 f"got {c.run.profile!r}")
    host, _, port = c.launch.rdzv_endpoint.rpartition(":")
    if c.launch.rdzv_endpoint and not (host and port.isdigit() and 0 < int(port) < 65536):
        p.append(f"launch.rdzv_endpoint: expected HOST:PORT, got {c.launch.rdzv_endpoint!r}")
    if c.launch.nnodes > 1 and not c.launch.rdzv_endpoint:
        p.append("launch.rdzv_endpoint: a multi-node run needs --rdzv-endpoint HOST:PORT")
    return p


def parse_grad_compress(text: str) -> tuple[str, int]:
    """'powersgd:4' -> ('powersgd', 4); 'fp16' -> ('fp16', 0). ValueError if malformed."""
    kind, sep, rank = text.partition(":")
    if kind not in GRAD_COMPRESSIONS or (sep and kind != "powersgd"):
        raise ValueError(text)
    if kind != "powersgd":
        return kind, 0
    if sep and not (rank.isdigit() and int(rank) >= 1):
        raise ValueError(text)
    return kind, int(rank) if sep else POWERSGD_RANK


# PowerSGD's rank when --grad-compress powersgd names none: 2, the PowerSGD paper's choice for
# image models. On the default model (25 epochs, ddp x 2, one seed each) ranks 1, 2 and 4 ended
# 0.21, 0.32 and 0.03 points of test accuracy below seq, within its seeds' spread of 0.34; at
# 1024,1024 rank 2 lost 1.28 points in 5 epochs (docs/STUDY.md, section 5).
POWERSGD_RANK = 2


def _ddp_problems(d: DDPConfig) -> list[str]:
    """The ddp knobs' values, and the combinations that cannot work (whatever the mode)."""
    p = []
    try:
        compress, _ = parse_grad_compress(d.grad_compress)
    except ValueError:
        p.append(f"ddp.grad_compress: expected none, fp16, bf16, powersgd or powersgd:RANK "
                 f"(RANK >= 1), got {d.grad_compress!r}")
        compress = "?"
    checks = [
        # torch's PowerSGD memorizes buckets from its first compressed step; DDP rebuilds them
        # after the first update, so compression may start at the third (update 2) at earliest.
        ("ddp.powersgd_warmup", d.powersgd_warmup, d.powersgd_warmup >= 2, ">= 2 updates"),
        ("ddp.local_sgd", d.local_sgd, d.local_sgd >= 0, ">= 0 (0 = off)"),
        ("ddp.local_sgd_warmup", d.local_sgd_warmup, d.local_sgd_warmup >= 0, ">= 0 updates"),
    ]
    p += [f"{name}: must be {rule}, got {value!r}" for name, value, ok, rule in checks if not ok]
    if d.local_sgd and d.zero:
        p.append("ddp.zero with ddp.local_sgd: ZeRO broadcasts every rank's shard of the "
                 "parameters after each update, which would undo the local steps; use one")
    if d.local_sgd and compress not in ("none", "?"):
        p.append(f"ddp.grad_compress {d.grad_compress} with ddp.local_sgd: both are DDP's one "
                 "gradient hook (local SGD sums no gradients after its warm-up); use one")
    return p


DDP_DEFAULTS = DDPConfig()


def ddp_knobs(c: Config) -> list[str]:
    """The ddp knobs this config sets away from their defaults, as 'key=value'."""
    return [f"{f.name}={getattr(c.ddp, f.name)!r}" for f in fields(DDPConfig)
            if getattr(c.ddp, f.name) != getattr(DDP_DEFAULTS, f.name)]


def ignored_by_mode(mode: str, c: Config) -> list[str]:
    """Settings that `mode` would silently not use: each one a problem to report."""
    p = []
    if mode != "ddp" and ddp_knobs(c):
        p.append(f"[ddp] {', '.join(ddp_knobs(c))}: ddp's own knobs; {mode} "
                 + ("trains in one process, without a gradient sum" if mode == "seq" else
                    "sums gradients by reduce-scatter with its sharded optimizer")
                 + ", so leave them out (or train with `dptrain ddp`)")
    if mode == "ddp" and c.system.grad_sync == "shm" and c.ddp.grad_compress != "none":
        p.append(f"ddp.grad_compress {c.ddp.grad_compress} with --grad-sync shm: compression "
                 "saves bytes on a link, and torch's hooks send them through the process "
                 "group; the shared-memory sum has no link to save on. Use --grad-sync "
                 "collective (or auto)")
    if mode == "ddp" and c.system.grad_sync == "shm" and c.ddp.local_sgd:
        p.append("ddp.local_sgd with --grad-sync shm: torch's post-local SGD sums the "
                 "warm-up's gradients and averages the parameters through the process group; "
                 "use --grad-sync collective (or auto)")
    if mode == "fsdp" and c.system.grad_sync == "shm":
        p.append("system.grad_sync: fsdp always sums gradients through the process group "
                 "(reduce-scatter); shm is ddp's, so leave --grad-sync out with fsdp")
    if mode in ("ddp", "fsdp") and not c.launch.rdzv_endpoint:
        # One node, no endpoint: torchrun --standalone, which takes no rendezvous settings.
        if c.launch.rdzv_id:
            p.append("launch.rdzv_id: names a multi-node job; it needs --rdzv-endpoint HOST:PORT "
                     "(one node meets on a free local port)")
        if c.launch.rdzv_backend != "c10d":
            p.append(f"launch.rdzv_backend: {c.launch.rdzv_backend} needs --rdzv-endpoint "
                     "HOST:PORT (one node meets on a free local port)")
    return p


@dataclass(kw_only=True, frozen=True)
class Plan:
    """What a config means at a given world size: batches, updates and the learning rate."""

    mode: str
    world_size: int
    n_train: int
    global_batch: int
    updates_per_epoch: int
    samples_per_epoch: int  # n_train, less the dropped tail
    base_lr: float  # the configured lr
    lr: float  # after the scaling rule
    warmup_steps: int
    total_steps: int = 0  # updates of the whole run (epochs x updates_per_epoch)
    lr_schedule: str = "constant"  # after the warmup (OptimConfig.lr_schedule)
    lr_final_fraction: float = 0.0
    lr_step_updates: int = 1  # step: updates between two steps down
    lr_step_factor: float = 0.1

    @property
    def per_rank_batch(self) -> float:
        """Samples per rank per update (the seed study's B_para); fractional when uneven."""
        return self.global_batch / self.world_size

    def lr_at(self, step: int) -> float:
        """The lr for update `step` (0-based over the whole run): a linear warmup from the base
        lr to the scaled lr, then the schedule. A pure function of the update index, so that a
        resumed run goes on exactly, and a checkpoint's recorded lrs can be checked."""
        if step < self.warmup_steps:
            return self.base_lr + (self.lr - self.base_lr) * step / self.warmup_steps
        return self.lr * self.schedule_factor(step - self.warmup_steps)

    def schedule_factor(self, after_warmup: int) -> float:
        """The schedule's multiple of the scaled lr, `after_warmup` updates after the warmup."""
        if self.lr_schedule == "step":
            return self.lr_step_factor ** (after_warmup // self.lr_step_updates)
        if self.lr_schedule == "constant":
            return 1.0
        # cosine and linear reach the final fraction as the run ends (after its last update).
        progress = min(after_warmup / max(self.total_steps - self.warmup_steps, 1), 1.0)
        final = self.lr_final_fraction
        if self.lr_schedule == "cosine":
            return final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2
        return 1 - (1 - final) * progress

    def schedule_text(self) -> str:
        """The resolved schedule in a few words, e.g. 'cosine 0.01 -> 0 over epochs 3-25'."""
        first = self.warmup_steps // self.updates_per_epoch + 1
        warmup = (f"warmup {self.base_lr:.4g} -> {self.lr:.4g} over {_epochs(1, first - 1)}, "
                  "then " if self.warmup_steps else "")
        if self.lr_schedule == "constant":
            return f"{warmup}constant {self.lr:.4g}"
        if self.lr_schedule == "step":
            every = self.lr_step_updates // self.updates_per_epoch
            return (f"{warmup}step {self.lr:.4g} x {self.lr_step_factor:g} every {every} "
                    f"epoch{'s' if every != 1 else ''} from epoch {first}")
        last = self.total_steps // self.updates_per_epoch
        return (f"{warmup}{self.lr_schedule} {self.lr:.4g} -> "
                f"{self.lr * self.lr_final_fraction:.4g} over {_epochs(first, last)}")


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def resolve_lr(optim: OptimConfig, global_batch: int, world_size: int) -> float:
    """The learning rate after `optim.lr_scaling`.

    linear (Goyal et al. 2017): lr * global_batch / ref_batch_size.
    sqrt: lr * sqrt(global_batch / ref_batch_size), the rule usually recommended for Adam,
    whose steps are normalised by the gradient's running size (Malladi et al. 2022).
    seed (the seed study): lr_para = lr_seq * B_para / B_seq, with B_para the per-rank batch
    and B_seq = ref_batch_size, the batch the sequential lr was tuned for.
    """
    if optim.lr_scaling == "linear":
        return optim.lr * global_batch / optim.ref_batch_size
    if optim.lr_scaling == "sqrt":
        return optim.lr * math.sqrt(global_batch / optim.ref_batch_size)
    if optim.lr_scaling == "seed":
        return optim.lr * (global_batch / world_size) / optim.ref_batch_size
    return optim.lr


def resolve(config: Config, *, mode: str, world_size: int, n_train: int) -> Plan:
    """Check the config against the world size and data, and fix batches and lr."""
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "seq" and world_size != 1:
        raise ConfigError(f"seq runs in one process, but the world size is {world_size}")
    if ignored_by_mode(mode, config):
        raise ConfigError("; ".join(ignored_by_mode(mode, config)))
    train = config.train
    global_batch = n_train if train.full_batch else train.batch_size
    problems = []
    if global_batch > n_train:
        problems.append(f"train.batch_size: {global_batch} exceeds the {n_train} training "
                        "samples; use --full-batch for one update per epoch")
    if global_batch < world_size:
        problems.append(f"train.batch_size: the global batch {global_batch} is smaller than "
                        f"the world size {world_size}; every rank needs at least one sample")
    elif train.accumulate > global_batch // world_size:
        share = global_batch // world_size
        problems.append(f"train.accumulate: {train.accumulate} micro-batches, but a rank's share "
                        f"of the global batch {global_batch} over {world_size} rank(s) is only "
                        f"{share} sample(s); use --accumulate {share} or less")
    lr = resolve_lr(config.optim, global_batch, world_size)
    if not (0 < lr < math.inf):
        problems.append(f"optim.lr: {config.optim.lr!r} scaled by lr_scaling "
                        f"{config.optim.lr_scaling} at a global batch of {global_batch} (ref "
                        f"{config.optim.ref_batch_size}) is {lr!r}; it must be finite and > 0")
    if problems:
        raise ConfigError("; ".join(problems))
    if train.drop_last:
        updates_per_epoch = n_train // global_batch
        samples_per_epoch = updates_per_epoch * global_batch
    else:
        updates_per_epoch = math.ceil(n_train / global_batch)
        samples_per_epoch = n_train
    updates = train.epochs * updates_per_epoch
    if config.run.profile and int(config.run.profile.split(":")[0]) >= updates:
        raise ConfigError(f"run.profile: {config.run.profile} starts after the run's last update "
                          f"(it makes {updates}: {train.epochs} epochs x {updates_per_epoch}); "
                          f"choose a START below {updates}, such as 0:{min(5, updates)}")
    return Plan(mode=mode, world_size=world_size, n_train=n_train, global_batch=global_batch,
                updates_per_epoch=updates_per_epoch, samples_per_epoch=samples_per_epoch,
                base_lr=config.optim.lr, lr=lr,
                warmup_steps=config.optim.warmup_epochs * updates_per_epoch,
                total_steps=train.epochs * updates_per_epoch,
                lr_schedule=config.optim.lr_schedule,
                lr_final_fraction=config.optim.lr_final_fraction,
                lr_step_updates=config.optim.lr_step_epochs * updates_per_epoch,
                lr_step_factor=config.optim.lr_step_factor)


# Multiply-adds per rank per training step (per-rank batch x one sample's forward products,
# step_work) from which a second intra-op thread is used, when a core is free for it.
# benchmarks/threads.py on the quiet 2-core VM (load ~1): from 1.7e7 up, 2 threads were at
# least 1.5x faster in every case (1.65-1.94x from 5e7); below, 1.0-1.48x (the default model at
# batch 1024, 1.33e7: 1.29x). A second thread whose core another process takes made the default
# `dptrain seq` 10-25x slower (issue 13), so it must buy more than a few tens of percent.
THREAD_MIN_WORK = 2e7


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which a cluster scheduler may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def step_work(hidden: tuple[int, ...], per_rank_batch: float) -> float:
    """Multiply-adds of one rank's forward pass in one training step (backward is ~2x that)."""
    sizes = [784, *hidden, 10]
    return per_rank_batch * sum(a * b for a, b in zip(sizes, sizes[1:]))


def free_cores(window: float = 0.1) -> float:
    """Cores of this process's affinity mask that other processes left idle over `window`
    seconds, from two reads of /proc/stat (its per-CPU idle and iowait ticks); all of them
    where /proc/stat cannot be read. Costs the window: call it only when the answer matters."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    before = _cpu_ticks(mine)
    if not before:
        return float(cpu_cores())
    time.sleep(window)
    after = _cpu_ticks(mine)
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        elapsed = total_after - total_before
        idle += (idle_after - idle_before) / elapsed if elapsed > 0 else 1.0
    return idle


def _cpu_ticks(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (idle + iowait ticks, all ticks)} for `cpus`, from /proc/stat; {} if unreadable."""
    ticks = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            counts = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (counts[3] + counts[4], sum(counts))
    return ticks


def resolve_threads(system: SystemConfig, plan: Plan, hidden: tuple[int, ...],
                    local_world_size: int, *, measure_load: bool = True) -> int:
    """Intra-op threads per rank. As configured when set; else 1 while a step is too small to
    split (THREAD_MIN_WORK); else one rank's share of the node's cores that are free now
    (measured over 0.1 s; `measure_load=False`: of all its cores, as a scheduler allots them)."""
    if system.threads:
        return system.threads
    if step_work(hidden, math.ceil(plan.per_rank_batch)) < THREAD_MIN_WORK:
        return 1
    cores = min(cpu_cores(), round(free_cores())) if measure_load else cpu_cores()
    return max(1, cores // local_world_size)


def to_toml(config: Config, resolved: dict[str, Any] | None = None, *,
            reusable: bool = False) -> str:
    """The config as TOML that `read_toml` + `build_config` read back to the same Config.

    reusable: a run folder's config.toml, which users pass again as --config for new runs.
    It leaves [run] out out (it goes to [resolved]): a file reused as a template must never aim
    the new run at the old folder, where following the --force hint would delete that run.
    """
    lines = []
    tree = asdict(config)
    if reusable:
        resolved = {**(resolved or {}), "out": tree["run"].pop("out")}
        lines.append("# Reusable as --config: a new run gets its own --out ([resolved] is ignored).")
    if resolved is not None:
        tree[RESOLVED_SECTION] = resolved
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
