"""Checkpoints: RUN_DIR/checkpoints/epoch-NNNN/, complete or not there at all, and found again.

A checkpoint is written under a temporary name (.epoch-NNNN.tmp): the strategy writes the model
and optimizer state into it (seq/ddp: rank 0, one torch.save file; fsdp: every rank its shards,
with torch.distributed.checkpoint), then rank 0 writes the manifest (meta.json: epoch, step,
mode, world size, the resolved config, RNG states, the metrics so far, and each file's size and
SHA-256) and renames the folder into place. A folder counts only when its manifest says complete
and every file matches it, so a crash at any moment leaves the previous checkpoint usable.

No torch at module level: the CLI reads manifests before it starts any worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dptrain.config import Config
from dptrain.errors import UserError
from dptrain.runlog import CHECKPOINTS, SUMMARY, StorageError, storage_error, write_atomic

META = "meta.json"
_FOLDER = re.compile(r"epoch-(\d+)")
# Flags that may differ from the checkpoint's config on --resume: they change where and how the
# run goes on, not what it computes (nproc may change the lr; the worker checks the plan).
MAY_CHANGE = {"epochs", "checkpoint_every", "keep", "out", "data_dir", "backend", "device",
              "threads", "timeout", "nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id",
              "rdzv_backend", "max_restarts"}


class CheckpointError(UserError):
    """A checkpoint folder that is incomplete, corrupt or missing."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    @property
    def records(self) -> list[dict]:
        """metrics.jsonl's records of epochs 1..epoch."""
        return self.meta["metrics"]


def folder_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _folders(run_dir: Path) -> list[Path]:
    """Checkpoint folders by name, newest epoch first (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and _FOLDER.fullmatch(p.name)] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(_FOLDER.fullmatch(p.name)[1]), reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint folder; CheckpointError saying what is wrong."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"no readable {META} (incomplete or corrupt)") from None
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise CheckpointError(f"{META} does not mark it complete")
    for name, (size, digest) in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        if file.stat().st_size != size or _sha256(file) != digest:
            raise CheckpointError(f"{name} does not match its checksum (corrupt)")
    return meta


def latest(run_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest complete checkpoint of a run, and one line per newer folder passed over."""
    skipped = []
    for path in _folders(run_dir):
        try:
            return Checkpoint(path, verify(path)), skipped
        except CheckpointError as e:
            skipped.append(f"{path}: {e}")
    return None, skipped


def find(path: Path) -> Checkpoint:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if _FOLDER.fullmatch(path.name) and path.parent.name == CHECKPOINTS:
        try:
            return Checkpoint(path, verify(path))
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    found, _ = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint "
                              f"({path / CHECKPOINTS}/epoch-NNNN/)")
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(strategy, model, optimizer, run_dir: Path, meta: dict[str, Any], keep: int) -> None:
    """Checkpoint meta["epoch"]; every rank must call it. Keeps the newest `keep` checkpoints.

    The last of meta["metrics"] is this epoch's record: it gets `checkpoint_seconds`, the time
    spent writing the state, before the manifest is written.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = folder_name(meta["epoch"])
    tmp = root / f".{name}.tmp"
    main = strategy.env.is_main

    def together(action) -> None:
        # The same collectives on every rank, whoever fails: a failure is everyone's, at once.
        problem, full = None, None
        try:
            action()
        except (OSError, UserError) as e:
            problem, full = _write_problem(e, root)
        except BaseException as e:  # DCP wraps each rank's error (a BaseException)
            problem, full = _write_problem(_os_error_of(e), root)
            if problem is None:
                raise
        if not strategy.all_agree(problem is None):
            if main:  # a full disk, say: the partial folder goes, the earlier ones stay
                shutil.rmtree(tmp, ignore_errors=True)
            message = f"cannot write checkpoint {root / name}: {problem or 'another rank failed'}"
            raise CheckpointError(message) if full is None else StorageError(message, full=full)

    start = time.perf_counter()
    together(lambda: _fresh_folder(tmp) if main else None)
    together(lambda: strategy.save_state(model, optimizer, tmp))
    meta["metrics"][-1]["checkpoint_seconds"] = time.perf_counter() - start
    together(lambda: (_commit(tmp, root / name, meta), prune(run_dir, keep)) if main else None)


def _write_problem(error, root: Path) -> tuple[str | None, bool | None]:
    """What went wrong writing a checkpoint, in a few words, and whether the disk or the folder
    is to blame (full disk: True; no permission, say: False; else None); (None, None) if
    `error` is no write error."""
    if isinstance(error, OSError):
        error = storage_error(error, error.filename or root) or error
    if isinstance(error, StorageError):  # "cannot write FILE: no space left on device"
        return str(error).removeprefix("cannot write "), error.full
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename or root})", None
    if isinstance(error, UserError):
        return str(error), None
    return None, None


def _os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind a torch.distributed.checkpoint failure, if that is what it is."""
    for cause, _trace in getattr(error, "failures", {}).values():
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return cause
    return None


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a crash
    path.mkdir(parents=True)


def _commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Manifest last, then the rename that makes the folder count (rank 0)."""
    files = {p.name: [p.stat().st_size, _sha256(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
    text = json.dumps({**meta, "files": files, "complete": True}, indent=1) + "\n"
    write_atomic(tmp / META, lambda f: f.write(text.encode()))
    _fsync_dir(tmp)
    if final.exists():  # an incomplete or corrupt folder of the same epoch: replaced, not merged
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def prune(run_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`; incomplete ones are left to be seen."""
    complete = []
    for path in _folders(run_dir):
        try:
            verify(path)
            complete.append(path)
        except CheckpointError:
            pass
    for path in complete[keep:]:
        shutil.rmtree(path)


def manifest(*, epoch: int, step: int, mode: str, world_size: int, config: Config, plan,
             records: list[dict], train_seconds: float, checkpoint_format: str) -> dict[str, Any]:
    """What a checkpoint records besides the state (JSON)."""
    return {"epoch": epoch, "step": step, "mode": mode, "world_size": world_size,
            "format": checkpoint_format, "config": asdict(config),
            "plan": {"global_batch": plan.global_batch, "updates_per_epoch": plan.updates_per_epoch,
                     "lr": plan.lr},
            "metrics": records, "train_seconds": train_seconds, "rng": rng_state(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def restore(strategy, model, optimizer, checkpoint: Checkpoint) -> None:
    """Load a checkpoint into this rank's model and optimizer, and its RNG states."""
    strategy.load_state(model, optimizer, checkpoint.path)
    set_rng_state(checkpoint.meta["rng"])


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global RNG states, as JSON (the big words as base64)."""
    import numpy as np
    import torch

    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = _b64(numpy_state["state"]["key"].astype(np.uint32))
    version, internal, gauss = random.getstate()
    return {"torch": _b64(torch.get_rng_state().numpy()), "numpy": numpy_state,
            "python": [version, _b64(np.array(internal, dtype=np.uint32)), gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8).copy()))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"],
                            "key": _unb64(numpy_state["state"]["key"], np.uint32)}
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in _unb64(internal, np.uint32)), gauss))


def _b64(array) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _unb64(text: str, dtype):
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def resume_config(mode: str, run_dir: Path, flags: dict[str, Any]) -> Config:
    """The config a resumed run goes on with: the checkpoint's, and only flags in MAY_CHANGE.

    A flag or --config value that would change what the run computes is refused in one line.
    """
    from dptrain.config import build_config
    from dptrain.flags import config_from_flags

    found = find(run_dir)
    if found.meta["mode"] != mode:
        raise UserError(f"--resume {run_dir}: its checkpoints were written by "
                        f"`dptrain {found.meta['mode']}`; resume it with that command")
    if flags.get("out") and Path(flags["out"]).resolve() != Path(run_dir).resolve():
        raise UserError(f"--resume {run_dir} continues in {run_dir}; drop --out {flags['out']}")
    saved = build_config(found.meta["config"], source=str(found.path / META))
    config = config_from_flags({**flags, "out": str(run_dir)}, base=found.meta["config"])
    changed = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(saved, config)
               if key not in MAY_CHANGE]
    if changed:
        raise UserError(f"--resume {run_dir}: {', '.join(changed)} would change the run; only "
                        "--epochs, the checkpoint, system and launch flags may differ (start a "
                        "new run with another --out instead)")
    if config.train.epochs < found.epoch:
        raise UserError(f"--resume {run_dir}: its checkpoint is at epoch {found.epoch}; "
                        f"--epochs must be at least that, got {config.train.epochs}")
    if config.train.epochs == found.epoch and (Path(run_dir) / SUMMARY).exists():
        raise UserError(f"--resume {run_dir}: the run has finished all {found.epoch} epochs; "
                        "pass a larger --epochs to train on")
    return config


def _differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    tree_a, tree_b = asdict(a), asdict(b)
    return [(key, value, tree_b[section][key]) for section, values in tree_a.items()
            for key, value in values.items() if tree_b[section][key] != value]


def export(source: Path, out: Path) -> Checkpoint:
    """Write the model of a checkpoint (or of a run's newest one) as a plain model.pt."""
    import torch

    from dptrain.config import build_config
    from dptrain.model import MLP
    from dptrain.strategy import STATE_FILE

    checkpoint = find(source)
    if checkpoint.meta["format"] == "dcp":
        # No process group: DCP reads every shard into the full tensors of a fresh model.
        import warnings

        import torch.distributed.checkpoint as dcp

        model = build_config(checkpoint.meta["config"]).model
        state = MLP(model.hidden, model.activation).state_dict()
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=checkpoint.path)
    else:
        state = torch.load(checkpoint.path / STATE_FILE, map_location="cpu",
                           weights_only=True)["model"]
    write_atomic(out, lambda f: torch.save(state, f))
    return checkpoint


def config_and_resume(mode: str, flags: dict[str, Any]) -> tuple[Config, str]:
    """The run's config from the flags, and the run folder to resume from ("" = a fresh start).

    --resume auto continues --out when it holds a complete checkpoint, and starts it otherwise.
    """
    from dptrain.flags import config_from_flags

    resume = flags.get("resume") or ""
    if resume == "auto":
        fresh = config_from_flags(flags)
        if not fresh.run.out:
            raise UserError("--resume auto continues the run in --out; give --out RUN_DIR")
        found, _ = latest(Path(fresh.run.out))
        if found is None:
            return fresh, ""
        resume = fresh.run.out
    if not resume:
        return config_from_flags(flags), ""
    return resume_config(mode, Path(resume), flags), resume
