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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dptrain.config import Config
from dptrain.errors import UserError
from dptrain.storage.manifest import InvalidManifest, check_manifest, check_plan
from dptrain.storage.runlog import (CHECKPOINTS, StorageError, finished_epoch, storage_error,
                                    write_atomic)

META = "meta.json"
_FOLDER = re.compile(r"epoch-(\d+)")
_TMP_FOLDER = re.compile(r"\.epoch-(\d+)\.tmp")
# RUN/checkpoints/best/epoch-NNNN/: the best epoch's checkpoint (--keep-best), a complete one
# like the others, outside the --keep rotation; its folder name says which epoch it is.
BEST = "best"
# meta.json may hold at most this much (a 1-epoch manifest has ~15 KB: config, RNG states,
# one record per epoch, which other modules may extend a little) and nest this deep (~5).
MANIFEST_BYTES, MANIFEST_BYTES_PER_EPOCH, MANIFEST_MAX_BYTES = 1 << 20, 16 << 10, 64 << 20
MANIFEST_DEPTH = 32
# Flags that may differ from the checkpoint's config on --resume: they change where and how the
# run goes on, not what it computes (nproc may change the lr; the worker checks the plan).
# zero: ZeRO's parameters equal plain ddp's bit for bit (tests/test_ddp_knobs.py), and its
# checkpoint holds the consolidated optimizer state, which loads with and without it.
MAY_CHANGE = {"epochs", "checkpoint_every", "keep", "keep_best", "early_stop", "best_metric",
              "out", "data_dir", "backend", "device",
              "threads", "timeout", "nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id",
              "rdzv_backend", "max_restarts", "start_method", "zero",
              "phase_times", "noise_scale", "noise_every", "profile",
              "tensorboard"}  # the last five: what a run records


class CheckpointError(UserError):
    """A checkpoint folder that is incomplete, corrupt or missing."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    passed_over: tuple[str, ...] = ()  # find(RUN): why each newer folder was not taken

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    @property
    def records(self) -> list[dict]:
        """metrics.jsonl's records of epochs 1..epoch."""
        return self.meta["metrics"]


def stray_entries(run_dir: Path) -> list[str]:
    """Entries of RUN/checkpoints (and of its best/) named as a checkpoint folder (epoch-NNNN,
    its temporary .epoch-NNNN.tmp, or best) that are not real folders: a file, a symbolic link
    or anything else would fail the checkpoint of that epoch only when training reached it.
    One phrase per entry."""
    root = Path(run_dir) / CHECKPOINTS
    stray = []
    for folder in (root, root / BEST):
        if folder.is_symlink() or not folder.is_dir():
            continue  # checkpoints/ itself is RunLog's to check; best/ is said below
        for entry in sorted(folder.iterdir()):
            named = (_FOLDER.fullmatch(entry.name) or _TMP_FOLDER.fullmatch(entry.name)
                     or (folder == root and entry.name == BEST))
            if named and entry.is_symlink():
                stray.append(f"{entry} is a symbolic link")
            elif named and not entry.is_dir():
                stray.append(f"{entry} is a file, not a folder")
    return stray


def folder_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _folders(run_dir: Path, *, best: bool = False) -> list[Path]:
    """Checkpoint folders by name, newest epoch first (complete or not); `best`: those of
    checkpoints/best/ (one, but for a moment after a new best is written)."""
    root = Path(run_dir) / CHECKPOINTS / (BEST if best else "")
    found = [p for p in root.iterdir() if p.is_dir() and _FOLDER.fullmatch(p.name)] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(_FOLDER.fullmatch(p.name)[1]), reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint folder; CheckpointError saying what is wrong.

    Nothing in the folder is trusted: meta.json is read only as a regular file of bounded size
    and depth, the whole manifest is checked (manifest.py), every file it lists must be a
    regular file matching its size and SHA-256, and an fsdp checkpoint's `.metadata` must
    unpickle through the allowlist of DCP's classes (safedcp.py).
    """
    from dptrain.storage.safeload import LoadError

    path = Path(path)
    meta = _read_manifest(path)
    try:
        check_manifest(meta, path.name)
    except InvalidManifest as e:
        raise CheckpointError(f"{META} {e}") from None
    for name, (size, digest) in meta["files"].items():
        file = path / name
        if not os.path.lexists(file):
            raise CheckpointError(f"{name} is missing")
        try:
            matches = _matches(file, size, digest)
        except LoadError as e:
            raise CheckpointError(str(e)) from None
        if not matches:
            raise CheckpointError(f"{name} does not match its checksum (corrupt)")
    if meta["format"] == "dcp":
        from dptrain.storage.safedcp import read_dcp_metadata

        try:
            read_dcp_metadata(path, {name: size for name, (size, _) in meta["files"].items()})
        except LoadError as e:
            raise CheckpointError(str(e)) from None
    return meta


def _read_manifest(path: Path) -> Any:
    """meta.json of checkpoint folder `path`, parsed: a regular file (never a link, a FIFO or
    a device), of at most MANIFEST_BYTES plus MANIFEST_BYTES_PER_EPOCH for each epoch its
    folder's name gives, nested at most MANIFEST_DEPTH deep; CheckpointError if not."""
    from dptrain.storage.safeload import LoadError, nesting_depth, read_bounded

    epochs = int(_FOLDER.fullmatch(path.name)[1]) if _FOLDER.fullmatch(path.name) else 0
    limit = min(MANIFEST_BYTES + MANIFEST_BYTES_PER_EPOCH * epochs, MANIFEST_MAX_BYTES)
    try:
        text = read_bounded(path / META, limit, follow_links=False, shown_as=META)
    except LoadError as e:
        if not os.path.lexists(path / META):
            raise CheckpointError(f"no readable {META} (incomplete or corrupt)") from None
        raise CheckpointError(str(e)) from None
    try:
        meta = json.loads(text)
    except RecursionError:
        meta = None
    except ValueError:
        raise CheckpointError(f"no readable {META} (incomplete or corrupt)") from None
    if meta is None or nesting_depth(meta) > MANIFEST_DEPTH:
        raise CheckpointError(f"{META} is nested more than {MANIFEST_DEPTH} levels deep, which "
                              "dptrain never writes")
    return meta


def latest(run_dir: Path, check=verify, *, best: bool = False) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of a run that passes `check` (a folder -> its manifest), and one
    line per newer folder passed over; `best`: the best checkpoint (--keep-best)."""
    skipped = []
    for path in _folders(run_dir, best=best):
        try:
            return Checkpoint(path, check(path)), skipped
        except CheckpointError as e:
            skipped.append(f"{path}: {e}")
    return None, skipped


def resumable(run_dir: Path, n_train: int) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint a run can go on from, and one line per newer folder passed over.

    Beyond verify: its plan is what its config resolves to on `n_train` training samples, and
    its state and RNG states load, as a trial, into a spare model, optimizer and generators on
    the CPU, so that a resume never fails after it has begun to rewrite the run folder.
    """
    return latest(run_dir, check=lambda path: _trial_restore(path, verify(path), n_train))


def _trial_restore(path: Path, meta: dict[str, Any], n_train: int) -> dict[str, Any]:
    import torch

    from dptrain.config import build_config, resolve
    from dptrain.storage.safeload import LoadError, first_line

    config = build_config(meta["config"])
    try:
        check_plan(meta, config, n_train)
    except InvalidManifest as e:
        raise CheckpointError(f"{META} {e}") from None
    plan = resolve(config, mode=meta["mode"], world_size=meta["world_size"], n_train=n_train)
    try:
        model, optimizer = _spare_model(config, plan.lr_at(0), what=str(path))
        load_state(meta["format"], model, optimizer, path, torch.device("cpu"))
        if meta["mode"] == "ddp":  # what ddp's knobs keep beside (PowerSGD's error, ...)
            from dptrain.distributed.strategy import load_knob_state

            load_knob_state(path, torch.device("cpu"), config.ddp, model, optimizer,
                            meta["world_size"], step=meta["step"])
    except LoadError as e:  # named within the folder: the caller names the folder
        text = str(e).removeprefix(f"{path}/").removeprefix(f"{path}: ")
        raise CheckpointError(text) from None
    _check_optimizer(optimizer, meta, plan.lr_at(meta["step"] - 1))
    try:
        _parse_rng(meta["rng"], spare=True)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{META} rng: not the generator states it should be "
                              f"({type(e).__name__}: {first_line(e)})") from None
    return meta


def _spare_model(config: Config, lr: float, *, what: str):
    """A CPU model and optimizer of `config`, to load a checkpoint into; memory.OutOfMemory
    first if this machine has no room for them."""
    from dptrain.components.memory import estimate_memory, require_memory
    from dptrain.components.model import MLP
    from dptrain.components.step import make_optimizer

    require_memory(estimate_memory(config, per_rank_batch=0), config, what=what)
    model = MLP(config.model.hidden, config.model.activation, config.train.loss)
    return model, make_optimizer(config.optim, model.parameters(), lr)


def load_state(checkpoint_format: str, model, optimizer, path: Path, device) -> None:
    """A checkpoint folder's state into `model` and `optimizer`, every tensor and setting
    checked against theirs first (strategy.STATE_LOADERS); safeload.LoadError if refused."""
    from dptrain.distributed.strategy import STATE_LOADERS

    STATE_LOADERS[checkpoint_format](model, optimizer, path, device)


def _check_optimizer(optimizer, meta: dict[str, Any], lr: float) -> None:
    """The saved optimizer agrees with the manifest: the lr of the last update and, where the
    optimizer counts them (Adam), the number of updates."""
    for group in optimizer.param_groups:
        if group["lr"] != lr:
            raise CheckpointError(f"the saved optimizer's lr {group['lr']!r} is not the "
                                  f"{lr!r} of {META}")
    for state in optimizer.state.values():
        if "step" in state and float(state["step"]) != meta["step"]:
            raise CheckpointError(f"the saved optimizer counts {float(state['step']):g} "
                                  f"updates, {META} {meta['step']}")


def find(path: Path) -> Checkpoint:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if _is_best(path):
        return _find_best(path)
    if _FOLDER.fullmatch(path.name) and path.parent.name == CHECKPOINTS:
        if not path.exists():
            raise CheckpointError(_not_there(path))
        try:
            return Checkpoint(path, verify(path))
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else
                              f"{path} is a file, not a run or checkpoint folder")
    found, skipped = latest(path)
    if found is None:
        why = f": {'; '.join(skipped)}" if skipped else f" ({path / CHECKPOINTS}/epoch-NNNN/)"
        raise CheckpointError(f"{path} holds no complete checkpoint{why}{best_hint(path)}")
    return replace(found, passed_over=tuple(skipped))


def names_a_checkpoint(path: Path) -> bool:
    """RUN/checkpoints/epoch-NNNN, or the best checkpoint (RUN/checkpoints/best[/epoch-NNNN])."""
    path = Path(path)
    return _is_best(path) or (_FOLDER.fullmatch(path.name) is not None
                              and path.parent.name == CHECKPOINTS)


def best_hint(run_dir: Path) -> str:
    """'; its best checkpoint is RUN/checkpoints/best' when it has one (--keep-best), else ''."""
    best = Path(run_dir) / CHECKPOINTS / BEST
    return f"; its best checkpoint is {best}" if _folders(run_dir, best=True) else ""


def _is_best(path: Path) -> bool:
    """RUN/checkpoints/best, or a folder in it."""
    return ((path.name == BEST and path.parent.name == CHECKPOINTS)
            or (_FOLDER.fullmatch(path.name) is not None and path.parent.name == BEST
                and path.parent.parent.name == CHECKPOINTS))


def _find_best(path: Path) -> Checkpoint:
    """The best checkpoint, named by RUN/checkpoints/best or its epoch-NNNN folder."""
    best = path if path.name == BEST else path.parent
    run_dir = best.parent.parent
    found, skipped = latest(run_dir, best=True)
    if found is None:
        why = (f": {'; '.join(skipped)}" if skipped else
               " (the run was started without --keep-best, or has not finished an epoch)")
        raise CheckpointError(f"{best} holds no complete best checkpoint{why}")
    if path is not best and found.path.name != path.name:
        raise CheckpointError(f"checkpoint {path} does not exist; the best checkpoint is "
                              f"{found.path}")
    return replace(found, passed_over=tuple(skipped))


def _not_there(path: Path) -> str:
    """Why RUN/checkpoints/epoch-NNNN is not there, and which checkpoints the run has."""
    from dptrain.config import build_config

    run_dir, epoch = path.parent.parent, int(_FOLDER.fullmatch(path.name)[1])
    found, _ = latest(run_dir)
    if found is None:
        return f"checkpoint {path} does not exist, and {run_dir} holds no complete checkpoint"
    kept = [p.name for p in reversed(_complete(run_dir))]
    run = build_config(found.meta["config"]).run
    if epoch > found.epoch:
        why = f"the run's newest checkpoint is {found.path.name}"
    elif run.checkpoint_every and epoch % run.checkpoint_every == 0:
        why = f"it was pruned: the run keeps its newest {run.keep} (--keep)"
    else:
        why = (f"it was never written (the run checkpoints every {run.checkpoint_every} "
               f"epochs) or was pruned")
    return (f"checkpoint {path} does not exist: {why}; the checkpoints in {path.parent} are "
            f"{', '.join(kept)}")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _matches(path: Path, size: int, digest: str) -> bool:
    """A regular file (never through a link) of `size` bytes and this SHA-256, read in blocks
    only when the size matches; safeload.LoadError if it is no regular file."""
    from dptrain.storage.safeload import open_regular

    with open_regular(path, follow_links=False, shown_as=path.name) as f:
        return (os.fstat(f.fileno()).st_size == size
                and hashlib.file_digest(f, "sha256").hexdigest() == digest)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(strategy, model, optimizer, run_dir: Path, meta: dict[str, Any], keep: int, *,
          best: bool = False) -> None:
    """Checkpoint meta["epoch"]; every rank must call it. Keeps the newest `keep` checkpoints;
    `best`: writes the best checkpoint instead, replacing the previous best once it is complete.

    The last of meta["metrics"] is this epoch's record: it gets `checkpoint_seconds`, the time
    spent writing the state (both writes', when an epoch is also the best), before the
    manifest is written.
    """
    root = Path(run_dir) / CHECKPOINTS / (BEST if best else "")
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
            # Every rank raises the first failing rank's words, so that whichever rank's error
            # the launcher shows names the cause (only a failing run pays this collective).
            problem, full = next(((p, f) for p, f in strategy.gather_object((problem, full))
                                  if p is not None), (problem, full))
            message = f"cannot write checkpoint {root / name}: {problem}"
            raise CheckpointError(message) if full is None else StorageError(message, full=full)

    start = time.perf_counter()
    together(lambda: _fresh_folder(tmp) if main else None)
    together(lambda: strategy.save_state(model, optimizer, tmp))
    record = meta["metrics"][-1]
    record["checkpoint_seconds"] = record.get("checkpoint_seconds", 0.0) + time.perf_counter() - start
    after = (lambda: _prune_best(root, name)) if best else (lambda: prune(run_dir, keep))
    together(lambda: (_commit(tmp, root / name, meta), after()) if main else None)


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


def _complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, newest first."""
    complete = []
    for path in _folders(run_dir):
        try:
            verify(path)
            complete.append(path)
        except CheckpointError:
            pass
    return complete


def prune(run_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep`; incomplete ones are left to be seen."""
    for path in _complete(run_dir)[keep:]:
        shutil.rmtree(path)


def _prune_best(root: Path, kept: str) -> None:
    """Delete every folder in checkpoints/best/ but the new best, `kept` (written just now)."""
    for path in root.iterdir():
        if path.name != kept and path.is_dir() and not path.is_symlink():
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
    """Set the global RNG states that rng_state() recorded."""
    import numpy as np
    import torch

    torch_state, numpy_state, python_state = _parse_rng(state)
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _parse_rng(state: dict[str, Any], *, spare: bool = False) -> tuple:
    """rng_state()'s JSON as the generators take it; with `spare`, set into spare generators
    (a trial: it raises what the global ones would, and changes nothing)."""
    import numpy as np
    import torch

    torch_state = torch.from_numpy(_unb64(state["torch"], np.uint8).copy())
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"],
                            "key": _unb64(numpy_state["state"]["key"], np.uint32)}
    version, internal, gauss = state["python"]
    python_state = (version, tuple(int(w) for w in _unb64(internal, np.uint32)), gauss)
    if spare:
        torch.Generator().set_state(torch_state)
        np.random.RandomState().set_state(numpy_state)
        random.Random().setstate(python_state)
    return torch_state, numpy_state, python_state


def _b64(array) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _unb64(text: str, dtype):
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype=dtype)


class Finished(Exception):
    """--resume of a run that has trained every epoch asked for: nothing to do (success)."""


def resume_config(mode: str, run_dir: Path, flags: dict[str, Any]) -> Config:
    """The config a resumed run goes on with: the checkpoint's, and only flags in MAY_CHANGE.

    A flag or --config value that would change what the run computes is refused in one line;
    Finished if the run has already trained every epoch asked for.
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
                        "--epochs, --early-stop, --best-metric, --zero, the checkpoint, system "
                        "and launch flags may differ (start a new run with another --out instead)")
    world_size = config.launch.nproc * config.launch.nnodes
    if _rank_state(config) and world_size != found.meta["world_size"]:
        raise UserError(f"--resume {run_dir}: {_rank_state(config)} keeps state of each of its "
                        f"{found.meta['world_size']} ranks; resume it at that world size "
                        f"(--nproc {found.meta['world_size'] // config.launch.nnodes}), not "
                        f"{world_size}")
    if config.train.epochs < found.epoch:
        raise UserError(f"--resume {run_dir}: its checkpoint is at epoch {found.epoch}; "
                        f"--epochs must be at least that, got {config.train.epochs}")
    # A summary counts only if it is of this checkpoint: an extension that crashed kept the
    # shorter run's summary beside the longer run's checkpoints.
    if finished_epoch(Path(run_dir)) == found.epoch:
        from dptrain.components.best import early_stop_reason

        if config.train.epochs == found.epoch:
            raise Finished(f"{run_dir} has already finished all {found.epoch} epochs; nothing "
                           "to do (pass a larger --epochs to train on)")
        stopped = early_stop_reason(found.records, config.train)
        if stopped:  # an early-stopped run does not train on unless told to
            raise Finished(f"{run_dir} stopped early at epoch {found.epoch}: {stopped}; nothing "
                           "to do (pass a larger --early-stop, or --early-stop 0, to train on)")
    _check_schedule_kept(run_dir, saved, config, found.epoch)
    return config


def _rank_state(config: Config) -> str:
    """The ddp knob whose checkpoint holds per-rank state ("" if none)."""
    if config.ddp.local_sgd:
        return "--local-sgd (each rank's own optimizer state)"
    if config.ddp.grad_compress.startswith("powersgd"):
        return "--grad-compress powersgd (each rank's error feedback)"
    return ""


def _check_schedule_kept(run_dir: Path, saved: Config, config: Config, trained: int) -> None:
    """A cosine or linear schedule decays over the run's epochs: another --epochs would change
    the lr of the epochs already trained, so a resume may not stretch or shrink it."""
    from dptrain.config import DECAYING

    schedule = saved.optim.lr_schedule
    if schedule in DECAYING and config.train.epochs != saved.train.epochs:
        raise UserError(f"--resume {run_dir}: --epochs {config.train.epochs} would change its "
                        f"{schedule} lr schedule, which decays over the run's "
                        f"{saved.train.epochs} epochs ({trained} of them trained); only a "
                        "constant or step schedule can be extended: start a new run for "
                        f"{config.train.epochs} epochs")


def _differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    tree_a, tree_b = asdict(a), asdict(b)
    return [(key, value, tree_b[section][key]) for section, values in tree_a.items()
            for key, value in values.items() if tree_b[section][key] != value]


def export(source: Path, out: Path) -> Checkpoint:
    """Write the model of a checkpoint (or of a run's newest one) as a plain model.pt."""
    import torch

    checkpoint = find(source)
    state = model_of(checkpoint).state_dict()
    write_atomic(out, lambda f: torch.save(state, f))
    return checkpoint


def model_of(checkpoint: Checkpoint):
    """A plain MLP (CPU) with a checkpoint's parameters.

    The checkpoint is loaded, with the checks of a resume, into a fresh MLP and optimizer of
    its config (an fsdp one without a process group: DCP reads every shard into the full
    tensors), so only a finite model of that shape is ever made; anything refused or
    unloadable is one line (safeload.LoadError).
    """
    import torch

    from dptrain.config import build_config

    config = build_config(checkpoint.meta["config"])
    model, optimizer = _spare_model(config, config.optim.lr, what=str(checkpoint.path))
    load_state(checkpoint.meta["format"], model, optimizer, checkpoint.path, torch.device("cpu"))
    return model


def config_and_resume(mode: str, flags: dict[str, Any]) -> tuple[Config, str]:
    """The run's config from the flags, and the run folder to resume from ("" = a fresh start).

    --resume auto continues --out when it holds a complete checkpoint, and starts it otherwise.
    --resume RUN/checkpoints/epoch-NNNN is --resume RUN when that is RUN's newest checkpoint.
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
    run_dir = _run_folder(Path(resume))
    return resume_config(mode, run_dir, flags), str(run_dir)


def _run_folder(path: Path) -> Path:
    """The run folder --resume names: itself, or the run of its newest complete checkpoint.

    A run goes on from its newest checkpoint only: going back to an older one would replace
    and prune the newer ones as it trains, so that is left to the user to do on purpose.
    """
    if _is_best(path):
        raise UserError(f"--resume {path}: a run goes on from its newest checkpoint, not its "
                        "best; pass --resume with the run folder (evaluate, predict and export "
                        "take the best checkpoint)")
    if not (_FOLDER.fullmatch(path.name) and path.parent.name == CHECKPOINTS):
        return path
    named, run_dir = find(path), path.parent.parent
    newest, _ = latest(run_dir)
    if newest.path.resolve() != named.path.resolve():
        raise UserError(f"--resume {path}: {run_dir} has a newer complete checkpoint, "
                        f"{newest.path.name}, and a run goes on from its newest; pass --resume "
                        f"{run_dir} (to go back to {path.name}, delete the newer checkpoint "
                        "folders first)")
    return run_dir
