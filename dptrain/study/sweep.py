"""`dptrain sweep`: a grid of trainings into one folder, each cell with its own seq reference.

The grid crosses the parallel modes and process counts with any config keys given by `--vary`
(Hydra's multirun syntax: `--vary batch_size=256,1024 --vary hidden=16,16:256,256`). Each run
is a child process (`python -m dptrain <mode> ...`), so a run that fails — a bad world size, a
crashed worker — is recorded with its error line and the sweep goes on. No torch here: the
sweep process only starts runs and reads their summary.json.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import platform
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from dptrain.config import (Config, ConfigError, DDPConfig, build_config, cpu_cores, ddp_knobs,
                            ignored_by_mode, read_toml, section_of, to_toml)
from dptrain.errors import UserError
from dptrain.storage.runlog import (METRICS, SUMMARY, RunLock, read_json, read_records,
                                    read_small, read_summary, storage_errors, write_atomic)

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CONFIG = "sweep-config.toml"
# A cell's seq reference, where the cell sets ddp's knobs: the same config without them.
SEQ_CONFIG = "sweep-config-seq.toml"
# The varied keys go after nproc, one column each.
COLUMNS = ("mode", "nproc", "status", "threads", "grad_sync", "global_batch", "accumulate",
           "precision", "grad_compress", "powersgd_warmup", "local_sgd", "local_sgd_warmup", "zero",
           "updates_per_epoch", "lr", "epochs", "val_accuracy", "test_accuracy",
           "test_loss", "noise_scale", "train_seconds", "epoch_seconds", "wall_seconds", "speedup", "efficiency",
           "wall_speedup", "wall_efficiency", "peak_rss_bytes", "param_bytes", "grad_bytes",
           "optimizer_bytes", "peak_gpu_bytes", "run_dir", "error")
MEMORY_KEYS = ("peak_rss_bytes", "param_bytes", "grad_bytes", "optimizer_bytes",
               "peak_gpu_bytes")
SWEEP_MODES = ("ddp", "fsdp")
DEFAULT_NPROCS = "1,2,4,6,8"
# Keys the sweep decides itself: the run folders, and the process count (--nproc).
# Keys whose values hold ':' themselves (powersgd:4): --vary splits them at commas only.
COLON_VALUES = {"grad_compress"}
NOT_VARIED = {"out": "the sweep names each run's folder", "nproc": "use --nproc"}
INTERRUPTED = 130
# A failed run that may well succeed when run again: --resume re-runs it, and the sweep is not
# complete while one is recorded. (A run killed by a signal fails with a negative status.)
TRANSIENT = ("is in use by another", "by signal", "no space left on device",
             "disk quota exceeded")
SWEEP_JSON_BYTES = 64 << 20  # far above a sweep's record (~1 kB a run)
# Seconds a run stopped by the sweep (SIGTERM) has to stop its workers, before SIGKILL.
STOP_SECONDS = 30


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM reached the sweep: it stops after writing what it has."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class _Stop:
    """A stop asked for by a signal (stop_on_signal), and the run it must reach."""

    signum: int | None = None
    child: subprocess.Popen | None = None


def stop_on_signal(signum: int, _frame) -> None:
    """The sweep's handler of SIGTERM and SIGINT: the running run gets SIGTERM (it stops its
    workers and says where it got), and the sweep stops once it has ended.

    It raises nothing: raised in a handler, an exception can land in an at-fork callback of
    the Popen that starts a run, where Python only prints it, and the sweep went on.
    """
    _Stop.signum = signum
    child = _Stop.child
    if child is not None and child.returncode is None:
        child.send_signal(signal.SIGTERM)


def _check_stop(name: str) -> None:
    if _Stop.signum is not None:
        what = ("was interrupted" if _Stop.signum == signal.SIGINT
                else f"was stopped by signal {signal.Signals(_Stop.signum).name}")
        raise SweepInterrupted(f"{name} {what}", _Stop.signum)


@dataclass(frozen=True)
class Axis:
    """One --vary: a config key and its values, parsed, with the text each was written as."""

    key: str
    values: tuple
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: modes x nprocs in every cell of the varied keys (one cell if none)."""

    modes: tuple[str, ...]
    nprocs: tuple[int, ...]
    axes: tuple[Axis, ...] = ()
    with_seq: bool = True

    def cells(self) -> list[tuple[tuple[Axis, int], ...]]:
        """Every combination of the varied values, as (axis, index of its value) pairs."""
        return list(itertools.product(*[[(a, i) for i in range(len(a.values))]
                                        for a in self.axes]))

    def runs_per_cell(self) -> list[tuple[str, int]]:
        if self.modes == ("seq",):
            return [("seq", 1)]
        return ([("seq", 1)] if self.with_seq else []) + [
            (mode, n) for mode in self.modes for n in self.nprocs]

    def meta(self) -> dict:
        return {"modes": list(self.modes), "nprocs": list(self.nprocs),
                "with_seq": self.with_seq,
                "vary": [{"key": a.key, "values": list(a.texts)} for a in self.axes]}


def parse_nprocs(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each count >= 1, no repeats."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--nproc: expected comma-separated process counts such as 1,2,4, "
                          f"got {text!r}") from None
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise ConfigError(f"--nproc: expected distinct process counts >= 1, got {text!r}")
    return counts


def parse_modes(text: str) -> list[str]:
    """'ddp,fsdp' -> ['ddp', 'fsdp']; 'seq' alone is a grid of seq runs."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if modes == ["seq"]:
        return modes
    if not modes or any(m not in SWEEP_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"--mode: expected {' or '.join(SWEEP_MODES)} (or both: ddp,fsdp; or "
                          f"seq alone, for a grid of seq runs), got {text!r}")
    return modes


def _config_fields() -> dict[str, Any]:
    """Every config key -> its field (the names are unique across sections)."""
    return {f.name: f for section in fields(Config) for f in fields(section.default.__class__)}


def parse_vary(text: str) -> Axis:
    """'KEY=V1,V2,...' -> Axis. Values are split at ':' when there is one (so that a value may
    hold commas: hidden=16,16:256,256), else at commas outside brackets, as in Hydra's multirun
    (batch_size=256,1024; hidden=[16,16],[256,256]); grad_compress, whose values hold ':'
    (powersgd:4), at commas only."""
    key, sep, rhs = text.partition("=")
    key = key.strip().rpartition(".")[2]  # train.batch_size or batch_size
    known = _config_fields()
    if not sep or not key or not rhs.strip():
        raise ConfigError(f"--vary: expected KEY=V1,V2,... such as batch_size=256,1024, "
                          f"got {text!r}")
    if key in NOT_VARIED:
        raise ConfigError(f"--vary {key}: not a key a sweep varies ({NOT_VARIED[key]})")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"--vary: unknown config key {key!r}{hint}")
    split_colons = ":" in rhs and key not in COLON_VALUES
    texts = rhs.split(":") if split_colons else re.findall(r"\[[^\]]*\]|[^,]+", rhs)
    texts = tuple(t.strip() for t in texts if t.strip())
    values = tuple(_parse_value(key, t, known[key].default) for t in texts)
    if len(set(values)) != len(values):
        hint = (f"; separate list values with ':' ({key}=16,16:256,256)"
                if isinstance(known[key].default, tuple) else "")
        raise ConfigError(f"--vary {key}: a value appears twice in {rhs!r}{hint}")
    return Axis(key, values, texts)


def _parse_value(key: str, text: str, default: Any) -> Any:
    """A --vary value as the type of the key's default (as a flag would be)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, tuple):
            return tuple(int(part) for part in text.strip("[]").split(","))
        return type(default)(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number",
                tuple: "comma-separated integers"}[type(default)]
        raise ConfigError(f"--vary {key}: expected {kind}, got {text!r}") from None


def column_of(key: str) -> str:
    """A varied key's column: the key, or section.key where the key names a result column
    (lr: the run's lr column is the scaled one; optim.lr is the base lr that was varied)."""
    return f"{section_of(key)}.{key}" if key in COLUMNS else key


def cell_name(cell) -> str:
    """The folder of a cell, e.g. 'batch_size=1024,hidden=256-256' (Hydra's override_dirname,
    lists joined by '-'); '' when nothing is varied."""
    parts = []
    for axis, i in cell:
        value = axis.values[i]
        text = "-".join(map(str, value)) if isinstance(value, tuple) else axis.texts[i]
        parts.append(f"{axis.key}={re.sub(r'[^A-Za-z0-9._+-]', '_', text)}")
    return ",".join(parts)


def cell_config(config: Config, cell) -> Config:
    """The config of one cell: the varied values on top, and threads fixed for every run.

    Every run of a cell, seq included, gets the same threads per process (the config's, else
    1), so a speedup compares processes, never the automatic thread rule at two world sizes.
    """
    tree = asdict(replace(config, run=replace(config.run, out="")))
    values = {axis.key: axis.values[i] for axis, i in cell}
    merged = build_config(tree, values, source="--vary")
    if not merged.system.threads:
        merged = replace(merged, system=replace(merged.system, threads=1))
    return merged


def check_modes(grid: Grid, configs: list[Config]) -> None:
    """Refuse, before any run, a cell that a swept mode would refuse: ddp's knobs in an fsdp
    run, say (each run would fail alike). A cell's seq reference runs without ddp's knobs
    (SEQ_CONFIG), so a grid of seq runs alone must not set them."""
    problems = []
    for cfg in configs:
        if grid.modes == ("seq",) and ddp_knobs(cfg):
            problems.append(f"--mode seq: ddp's knobs ({', '.join(ddp_knobs(cfg))}) would not "
                            "be used; sweep --mode ddp (each cell then has its seq reference)")
        for mode in set(grid.modes) - {"seq"}:
            problems += [f"--mode {mode}: {p}" for p in ignored_by_mode(mode, cfg)]
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def check_sweep_dir(out: Path, force: bool) -> None:
    """Refuse a folder that holds a finished sweep, unless forced; an interrupted one is reused
    (its finished runs are refused one by one, as a run folder is, or kept by --resume)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / SWEEP_JSON).exists() and read_sweep(out).get("complete") and not force:
        raise UserError(f"--out {out} already holds a finished sweep ({SWEEP_JSON}); choose "
                        "another folder, or pass --force to replace it")


def run_sweep(grid: Grid, config: Config, out: Path, *, force: bool = False,
              resume: bool = False, echo=print) -> list[dict[str, Any]]:
    """Run every cell's runs (seq first); write sweep.csv/json; return the rows.

    The sweep owns its folder while it runs (a lock, as a run owns its own), and writes only
    regular files of its own there, never through a link. resume: keep the runs that
    finished, continue the others from their checkpoints.
    """
    cells = grid.cells()
    configs = [cell_config(config, cell) for cell in cells]  # every bad value before any run
    check_modes(grid, configs)
    lock = RunLock(out, kind="sweep")
    lock.acquire()  # creates the folder
    try:
        if not resume:
            check_sweep_dir(out, force)
        plan = [(cell, mode, n) for cell in cells for mode, n in grid.runs_per_cell()]
        for cell, mode, nproc in plan:  # a link there would take the runs out of the folder
            _own_folder(out, cell_name(cell))
            _own_folder(out, _run_name(cell, mode, nproc))
        # The base config, for --resume; each cell's runs all read their cell's file.
        _write_text(out / SWEEP_CONFIG, to_toml(replace(config, run=replace(config.run, out=""))))
        for cell, cell_cfg in zip(cells, configs):
            folder = out / cell_name(cell)
            with storage_errors(folder):
                folder.mkdir(exist_ok=True)
            _write_text(folder / SWEEP_CONFIG, to_toml(cell_cfg))
            if cell_cfg.ddp != DDPConfig():  # the seq reference is seq fp32, without ddp's knobs
                _write_text(folder / SEQ_CONFIG, to_toml(replace(cell_cfg, ddp=DDPConfig())))
            else:  # one left by an earlier sweep in this folder would be the wrong config
                with storage_errors(folder):
                    (folder / SEQ_CONFIG).unlink(missing_ok=True)
        return _run_plan(plan, grid, out, force=force, resume=resume, echo=echo)
    finally:
        lock.release()


def _run_plan(plan, grid: Grid, out: Path, *, force: bool, resume: bool, echo) -> list[dict]:
    meta = {**grid.meta(), "complete": False, "cores": cpu_cores(), "host": platform.node()}
    write_results(out, [], grid, {**meta, "seconds": 0.0})  # --resume needs the plan at once
    started, rows = time.time(), []
    try:
        for cell, mode, nproc in plan:
            name = _run_name(cell, mode, nproc)
            echo(f"sweep: {escape(name)} ...")
            rows.append(run_one(out, cell, mode, nproc, force=force, resume=resume))
            echo(f"sweep: {escape(name)}: {_outcome(rows[-1])}")
    finally:  # an interrupted sweep still leaves the rows it finished
        add_speedups(rows)
        # Complete: every run has its final outcome (a transient failure is not one).
        complete = len(rows) == len(plan) and not any(r.get("transient") for r in rows)
        write_results(out, rows, grid, {**meta, "seconds": time.time() - started,
                                        "complete": complete})
    return rows


def _own_folder(out: Path, name: str) -> None:
    """OUT/NAME may be the sweep's folder: a plain relative name, and a real folder where it
    exists (not a link, nor a file)."""
    check_relative(name, "a run's folder")
    path = out
    for part in name.split("/") if name else []:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            what = "a symbolic link" if path.is_symlink() else "not a folder"
            raise UserError(f"{path} is {what}: a sweep writes only inside its folder; move it "
                            "away, or choose another --out")


def check_relative(name: str, what: str) -> str:
    """`name` as a path inside a sweep's folder: '' or one or two plain names joined by '/'
    (CELL/MODE-N); a UserError for anything else (.., an absolute path, a NUL, ...)."""
    parts = name.split("/") if isinstance(name, str) and name else []
    if not isinstance(name, str) or len(parts) > 2 or any(
            part in ("", ".", "..") or "\0" in part or "\\" in part for part in parts):
        raise UserError(f"{what} {name!r} is not a plain name inside the sweep's folder "
                        f"({SWEEP_JSON} damaged?)")
    return name


def _write_text(path: Path, text: str) -> None:
    """A new regular file renamed into place: a link at `path` is replaced, never followed."""
    write_atomic(path, lambda f: f.write(text.encode()))


def _run_name(cell, mode: str, nproc: int) -> str:
    return f"{cell_name(cell)}/{mode}-{nproc}" if cell else f"{mode}-{nproc}"


def run_one(out: Path, cell, mode: str, nproc: int, *, force: bool, resume: bool) -> dict:
    """One training as a child process; its output goes to <run>.log beside the run folder."""
    name = _run_name(cell, mode, nproc)
    run_dir = out / name
    varied = {axis.key: _json_value(axis.values[i]) for axis, i in cell}
    row = {"mode": mode, "nproc": nproc, "cell": cell_name(cell), "vary": varied,
           **{column_of(key): value for key, value in varied.items()}, "run_dir": name}
    if resume and (run_dir / SUMMARY).exists():
        return {**row, **_finished(run_dir), "kept": True}
    config_file = run_dir.parent / SWEEP_CONFIG
    if mode == "seq" and (run_dir.parent / SEQ_CONFIG).exists():
        config_file = run_dir.parent / SEQ_CONFIG
    argv = [sys.executable, "-m", "dptrain", mode, "--config", str(config_file),
            "--out", str(run_dir)]
    argv += ["--nproc", str(nproc)] if mode != "seq" else []
    argv += ["--resume", "auto"] if resume else ["--force"] if force else []
    started = time.time()
    _check_stop(name)
    with _new_log(run_dir.parent / f"{mode}-{nproc}.log") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=_die_with_sweep(os.getpid()))
        _Stop.child = child
        try:
            if _Stop.signum is not None:  # it came while the run was being started
                child.terminate()
            _, stderr = child.communicate()
        except BaseException:  # a Ctrl-C in this process: the run stops too
            _stop(child)
            raise
        finally:
            _Stop.child = None
        log.write(stderr)
    _check_stop(name)
    if child.returncode in (INTERRUPTED, -signal.SIGINT):
        raise SweepInterrupted(f"{name} was interrupted")
    if child.returncode != 0 or not (run_dir / SUMMARY).exists():
        error = error_line(stderr, child.returncode)
        return {**row, "status": "failed", "wall_seconds": time.time() - started,
                "error": error, "transient": is_transient(child.returncode, error)}
    return {**row, **_finished(run_dir)}


def is_transient(returncode: int, error: str) -> bool:
    """A failure that running again may mend: the folder was in use, the run was killed or
    stopped by a signal, the disk was full."""
    return returncode < 0 or returncode > 128 or any(words in error for words in TRANSIENT)


def _new_log(path: Path):
    """A run's log, created anew: whatever was at `path` (an older log, a link) is unlinked
    first, never written through."""
    with storage_errors(path):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            raise UserError(f"{path} is not a file: a sweep writes its runs' logs there; move "
                            "it away, or choose another --out")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    return os.fdopen(fd, "w")


def _die_with_sweep(sweep_pid: int):
    """A preexec function: the child run gets SIGTERM when the sweep dies, by SIGKILL too
    (Linux's PR_SET_PDEATHSIG); it then stops its workers as after a Ctrl-C."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
            os._exit(1)

    return preexec


def _stop(child: subprocess.Popen) -> None:
    """End a run: SIGTERM, which stops its workers, then SIGKILL if it is still there."""
    try:
        child.terminate()
        child.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    except BaseException:  # a second Ctrl-C: no more waiting
        child.kill()
        child.wait()
        raise


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _finished(run_dir: Path) -> dict:
    """The sweep's columns of a finished run: its summary, the largest per-rank memory, and
    its typical epoch."""
    summary = read_summary(run_dir)
    fields_ = {key: summary[key] for key in COLUMNS if key in summary and key != "run_dir"}
    memory = summary.get("memory", {})
    fields_.update({key: max(memory[key]) for key in MEMORY_KEYS if memory.get(key)})
    return {**fields_, "status": "ok", "error": "", "epoch_seconds": epoch_seconds(run_dir)}


def epoch_seconds(run_dir: Path) -> float | None:
    """Median seconds of an epoch's training steps, leaving out the first epoch when there
    are more (it also pays the warm-up: first touches of the data and of new buffers)."""
    seconds = [r["epoch_seconds"] for r in read_records(run_dir / METRICS)
               if isinstance(r.get("epoch_seconds"), (int, float))]
    return statistics.median(seconds[1:] or seconds) if seconds else None


def error_line(stderr: str, returncode: int) -> str:
    """The child's own error line, else its last line of output, else its exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("dptrain: error: "):
            return line.removeprefix("dptrain: error: ")
    return lines[-1] if lines else f"exit status {returncode}"


def add_speedups(rows: list[dict]) -> None:
    """speedup = seconds of the cell's seq run / the run's; efficiency = speedup / nproc (for
    train and wall time)."""
    seqs = {r.get("cell", ""): r for r in rows if r["mode"] == "seq" and r["status"] == "ok"}
    for row in rows:
        seq = seqs.get(row.get("cell", ""))
        for prefix, key in (("", "train_seconds"), ("wall_", "wall_seconds")):
            ok = seq is not None and row["status"] == "ok" and row.get(key)
            speedup = seq[key] / row[key] if ok else None
            row[f"{prefix}speedup"] = speedup
            row[f"{prefix}efficiency"] = speedup / row["nproc"] if ok else None


def write_results(out: Path, rows: list[dict], grid: Grid, meta: dict) -> None:
    """sweep.json (meta + rows) and sweep.csv (one row per run, a column per varied key,
    blanks for what is missing)."""
    columns = COLUMNS[:2] + tuple(column_of(a.key) for a in grid.axes) + COLUMNS[2:]

    def cell_text(value) -> str:
        if value is None:
            return ""
        return ",".join(map(str, value)) if isinstance(value, list) else value

    def write_csv(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell_text(row.get(k)) for k in columns})
        f.write(text.getvalue().encode())

    write_atomic(out / SWEEP_CSV, write_csv)
    payload = json.dumps({**meta, "runs": rows}, indent=2) + "\n"
    write_atomic(out / SWEEP_JSON, lambda f: f.write(payload.encode()))


def read_sweep(out: Path) -> dict:
    """sweep.json of a sweep; a folder without one is a UserError that says what it is."""
    out = Path(out)
    path = out / SWEEP_JSON
    if os.path.lexists(path):
        data = read_small(path, SWEEP_JSON_BYTES)
        try:
            meta = json.loads(data) if data is not None else None
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("runs", []), list):
            raise UserError(f"{path}: not a sweep's record (a regular JSON file that "
                            "`dptrain sweep` writes); damaged?")
        return meta
    if (out / SUMMARY).exists():
        raise UserError(f"{out} is a training run, not a sweep; draw its curves with "
                        f"`dptrain plot {out}`")
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    raise UserError(f"{out}: no {SWEEP_JSON} here; run `dptrain sweep --out {out}` first")


def grid_to_resume(out: Path) -> tuple[Grid, Config]:
    """The grid and base config of the interrupted sweep in `out`, for `--resume`. Every value
    from sweep.json is checked as the flags are: they name the files the sweep writes."""
    if not (out / SWEEP_JSON).exists() and (out / SUMMARY).exists():
        summary = read_json(out / SUMMARY)
        mode = summary.get("mode", "ddp") if isinstance(summary, dict) else "ddp"
        raise UserError(f"--resume {out}: a training run, not a sweep; continue a training run "
                        f"with `dptrain {mode} --resume {out}`")
    meta = read_sweep(out)
    if meta.get("complete"):
        raise UserError(f"--resume {out}: this sweep is complete; nothing to resume (pass "
                        "--force with the sweep's flags to run it again)")
    try:
        modes, nprocs, vary = meta["modes"], meta["nprocs"], meta["vary"]
        if not (all(isinstance(m, str) for m in modes) and isinstance(meta["with_seq"], bool)
                and all(type(n) is int for n in nprocs)
                and all(isinstance(t, str) for v in vary for t in v["values"])):
            raise TypeError
        grid = Grid(tuple(parse_modes(",".join(modes))), tuple(parse_nprocs(
            ",".join(map(str, nprocs)))), tuple(parse_vary(f"{v['key']}=" + ":".join(v["values"]))
                                                for v in vary), meta["with_seq"])
    except (KeyError, TypeError, ConfigError) as e:
        why = f": {e}" if isinstance(e, ConfigError) else ""
        raise UserError(f"--resume {out}: {SWEEP_JSON} does not hold a sweep's plan{why}") from None
    if (out / SWEEP_CONFIG).is_symlink():
        raise UserError(f"--resume {out}: {SWEEP_CONFIG} is a symbolic link; a sweep reads and "
                        "writes only its own files in its folder")
    config = build_config(read_toml(out / SWEEP_CONFIG), source=str(out / SWEEP_CONFIG))
    return grid, config


def _outcome(row: dict) -> str:
    if row["status"] != "ok":
        again = " (--resume runs it again)" if row.get("transient") else ""
        return f"[red]failed[/]: {escape(row['error'])}{again}"
    kept = " (finished before; kept)" if row.get("kept") else ""
    return (f"test accuracy {row['test_accuracy']:.4f}, train {row['train_seconds']:.1f} s, "
            f"wall {row['wall_seconds']:.1f} s{kept}")


def sweep_table(rows: list[dict], keys: list[str]):
    """The sweep as a rich table, one line per run, a column per varied key; sweep.csv has
    every column."""
    from rich import box
    from rich.table import Table

    table = Table(title="dptrain sweep", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    headers = ("mode", "nproc", *keys, "batch", "upd/ep", "lr", "test acc", "train s", "wall s",
               "speedup", "eff")
    for header in headers:
        table.add_column(header, justify="left" if header == "mode" or header in keys
                         else "right", no_wrap=True, min_width=len(header))
    for r in rows:
        values = [r["mode"], str(r["nproc"])] + [
            ",".join(map(str, v)) if isinstance(v := r["vary"][k], list) else str(v) for k in keys]
        if r["status"] != "ok":
            table.add_row(*values, "[red]failed[/]")
            continue
        table.add_row(*values, str(r["global_batch"]), str(r["updates_per_epoch"]),
                      f"{r['lr']:.4g}", f"{r['test_accuracy']:.4f}", f"{r['train_seconds']:.2f}",
                      f"{r['wall_seconds']:.2f}", _num(r["speedup"]), _num(r["efficiency"]))
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
