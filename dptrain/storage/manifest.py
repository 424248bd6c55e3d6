"""meta.json, a checkpoint's manifest: what it must hold, checked before anything acts on it.

A checkpoint folder may come from anywhere (users pass them around), so nothing in its manifest
is trusted: every key that is used must be there with its type and a sane value, and agree with
the folder's name, with the files it lists and with its own config (the plan, batches and lr
it resolves to). The number of training samples is checked by the worker, which has read the
data. No torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dptrain.config import MODES, Config, ConfigError, build_config, resolve

# The checkpoint format each mode writes (strategy.checkpoint_format) and the state files it
# needs; DCP also writes one or more shard files (*.distcp), which .metadata refers to.
FORMATS = {"seq": "torch", "ddp": "torch", "fsdp": "dcp"}
STATE_FILES = {"torch": ("state.pt",), "dcp": (".metadata",)}
KEYS = ("epoch", "step", "mode", "world_size", "format", "config", "plan", "metrics",
        "train_seconds", "rng", "files", "complete")
# Each epoch's record, as train() writes it into metrics.jsonl.
RECORD_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds",
               "val_seconds", "samples_per_second", "checkpoint_seconds")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class InvalidManifest(Exception):
    """What is wrong with a manifest, in a few words (the caller names the file)."""


def check_manifest(meta: Any, folder: str) -> Config:
    """The manifest's config, once the whole manifest has been checked; InvalidManifest if not.

    `folder` is the checkpoint folder's name (epoch-NNNN), which must agree with the epoch.
    """
    if not isinstance(meta, dict):
        raise InvalidManifest("is not a JSON object")
    missing = [key for key in KEYS if key not in meta]
    if missing:
        raise InvalidManifest(f"lacks {', '.join(missing)}")
    if meta["complete"] is not True:
        raise InvalidManifest("does not mark it complete")
    epoch = _integer(meta, "epoch", minimum=1)
    if folder != f"epoch-{epoch:04d}":
        raise InvalidManifest(f"says epoch {epoch}, but the folder is {folder}")
    mode = _one_of(meta, "mode", MODES)
    if meta["format"] != FORMATS[mode]:
        raise InvalidManifest(f"format {meta['format']!r} is not what {mode} writes "
                              f"({FORMATS[mode]!r})")
    world_size = _integer(meta, "world_size", minimum=1)
    if mode == "seq" and world_size != 1:
        raise InvalidManifest(f"world_size {world_size} for a seq run")
    config = _config(meta["config"])
    if epoch > config.train.epochs:
        raise InvalidManifest(f"epoch {epoch} is beyond its config's {config.train.epochs} epochs")
    updates = _plan(meta["plan"])
    if _integer(meta, "step", minimum=0) != epoch * updates:
        raise InvalidManifest(f"step {meta['step']} is not epoch {epoch} x {updates} updates")
    _metrics(meta["metrics"], epoch)
    _number(meta, "train_seconds", minimum=0.0)
    _rng(meta["rng"])
    _files(meta["files"], meta["format"])
    check_plan(meta, config)
    return config


def check_plan(meta: dict[str, Any], config: Config, n_train: int | None = None) -> None:
    """The manifest's plan and per-epoch lr are what its config resolves to at its world size:
    an edited lr, batch or warmup is not obeyed. Without `n_train` (the training samples; the
    CLI has not read the data yet) the number of updates per epoch is taken as given."""
    plan = meta["plan"]
    if n_train is None:  # the sample count that makes the manifest's updates per epoch exact
        n_train = plan["global_batch"] * plan["updates_per_epoch"]
    try:
        resolved = resolve(config, mode=meta["mode"], world_size=meta["world_size"],
                           n_train=n_train)
    except ConfigError as e:
        raise InvalidManifest(f"config does not resolve ({e})") from None
    for key in ("global_batch", "updates_per_epoch", "lr"):
        if plan[key] != getattr(resolved, key):
            raise InvalidManifest(f"plan.{key} is {plan[key]!r}, but its config resolves to "
                                  f"{getattr(resolved, key)!r}")
    for record in meta["metrics"]:
        last_step = record["epoch"] * resolved.updates_per_epoch - 1
        if record["lr"] != resolved.lr_at(last_step):
            raise InvalidManifest(f"metrics of epoch {record['epoch']}: lr {record['lr']!r}, but "
                                  f"its config gives {resolved.lr_at(last_step)!r}")


def _integer(tree: dict, key: str, *, minimum: int) -> int:
    value = tree[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidManifest(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _number(tree: dict, key: str, *, minimum: float, maximum: float = math.inf) -> float:
    value = tree[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not minimum <= value <= maximum:
        raise InvalidManifest(f"{key}: expected a finite number in [{minimum}, {maximum}], "
                              f"got {value!r}")
    return value


def _one_of(tree: dict, key: str, choices) -> str:
    if tree[key] not in choices:
        raise InvalidManifest(f"{key}: expected one of {', '.join(choices)}, got {tree[key]!r}")
    return tree[key]


def _config(tree: Any) -> Config:
    if not isinstance(tree, dict):
        raise InvalidManifest("config: expected a table of sections")
    try:
        return build_config(tree, source="config")
    except ConfigError as e:
        raise InvalidManifest(str(e)) from None


def _plan(plan: Any) -> int:
    """Types of the plan (its values are checked against the config by check_plan)."""
    if not isinstance(plan, dict) or not {"global_batch", "updates_per_epoch", "lr"} <= plan.keys():
        raise InvalidManifest("plan: expected global_batch, updates_per_epoch and lr")
    _integer(plan, "global_batch", minimum=1)
    _number(plan, "lr", minimum=0.0)
    return _integer(plan, "updates_per_epoch", minimum=1)


def _metrics(records: Any, epoch: int) -> None:
    """Exactly the records of epochs 1..epoch, each with sane numbers."""
    if not isinstance(records, list) or len(records) != epoch:
        raise InvalidManifest(f"metrics: expected the records of epochs 1 to {epoch}")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or record.get("epoch") != number:
            raise InvalidManifest(f"metrics: record {number} is not epoch {number}'s")
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise InvalidManifest(f"metrics of epoch {number} lack {', '.join(missing)}")
        try:
            for key in RECORD_KEYS[1:]:
                _number(record, key, minimum=0.0, maximum=1.0 if key == "val_accuracy" else math.inf)
        except InvalidManifest as e:
            raise InvalidManifest(f"metrics of epoch {number}: {e}") from None


def _rng(rng: Any) -> None:
    """The shape of rng_state()'s JSON; its contents are tried on spare generators on resume."""
    shapes = {"torch": str, "numpy": dict, "python": list}
    if not isinstance(rng, dict) or any(not isinstance(rng.get(k), t) for k, t in shapes.items()):
        raise InvalidManifest("rng: expected the torch, numpy and python generator states")


def _files(files: Any, checkpoint_format: str) -> None:
    """Plain names in this folder, each with [size, SHA-256], and the format's state files."""
    if not isinstance(files, dict):
        raise InvalidManifest("files: expected a table of file name -> [size, sha256]")
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", "..", "meta.json"):
            raise InvalidManifest(f"files: {name!r} is not a file of this folder")
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
              and not isinstance(entry[0], bool) and entry[0] >= 0
              and isinstance(entry[1], str) and _SHA256.fullmatch(entry[1]))
        if not ok:
            raise InvalidManifest(f"files: {name}: expected [size, sha256], got {entry!r}")
    needed = list(STATE_FILES[checkpoint_format])
    if checkpoint_format == "dcp" and not any(name.endswith(".distcp") for name in files):
        needed.append("*.distcp")
    missing = [name for name in needed if name not in files]
    if missing:
        raise InvalidManifest(f"files: does not list {', '.join(missing)}, which a "
                              f"{checkpoint_format} checkpoint needs")
