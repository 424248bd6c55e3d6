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
import re
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
from dptrain.storage.runlog import METRICS, SUMMARY, write_atomic

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CONFIG = "sweep-config.toml"
# A cell's seq reference, where the cell sets ddp's knobs: the same config without them.
SEQ_CONFIG = "sweep-config-seq.toml"
# The varied keys go after nproc, one column each.
COLUMNS = ("mode", "nproc", "status", "threads", "grad_sync", "grad_compress",
           "powersgd_warmup", "local_sgd", "local_sgd_warmup", "zero", "global_batch",
           "updates_per_epoch", "lr", "epochs", "val_accuracy", "test_accuracy", "test_loss",
           "train_seconds", "epoch_seconds", "wall_seconds", "speedup", "efficiency",
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


class SweepInterrupted(Exception):
    """Ctrl-C reached a run: the sweep stops after writing what it has."""


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
    path = out / SWEEP_JSON
    if path.exists() and json.loads(path.read_text()).get("complete") and not force:
        raise UserError(f"--out {out} already holds a finished sweep ({SWEEP_JSON}); choose "
                        "another folder, or pass --force to replace it")


def run_sweep(grid: Grid, config: Config, out: Path, *, force: bool = False,
              resume: bool = False, echo=print) -> list[dict[str, Any]]:
    """Run every cell's runs (seq first); write sweep.csv/json; return the rows.

    resume: keep the runs that finished, continue the others from their checkpoints.
    """
    cells = grid.cells()
    configs = [cell_config(config, cell) for cell in cells]  # every bad value before any run
    check_modes(grid, configs)
    if not resume:
        check_sweep_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    # The base config, for --resume; each cell's runs all read their cell's file.
    (out / SWEEP_CONFIG).write_text(to_toml(replace(config, run=replace(config.run, out=""))))
    plan = []
    for cell, cell_cfg in zip(cells, configs):
        folder = out / cell_name(cell)
        folder.mkdir(exist_ok=True)
        (folder / SWEEP_CONFIG).write_text(to_toml(cell_cfg))
        if cell_cfg.ddp != DDPConfig():  # the seq reference is seq fp32, without ddp's knobs
            (folder / SEQ_CONFIG).write_text(to_toml(replace(cell_cfg, ddp=DDPConfig())))
        plan += [(cell, mode, n) for mode, n in grid.runs_per_cell()]
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
        write_results(out, rows, grid, {**meta, "seconds": time.time() - started,
                                        "complete": len(rows) == len(plan)})
    return rows


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
    with open(run_dir.parent / f"{mode}-{nproc}.log", "w") as log:
        child = subprocess.run(argv, stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(child.stderr)
    if child.returncode in (INTERRUPTED, -2):
        raise SweepInterrupted(f"{name} was interrupted")
    if child.returncode != 0 or not (run_dir / SUMMARY).exists():
        return {**row, "status": "failed", "wall_seconds": time.time() - started,
                "error": error_line(child.stderr, child.returncode)}
    return {**row, **_finished(run_dir)}


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _finished(run_dir: Path) -> dict:
    """The sweep's columns of a finished run: its summary, the largest per-rank memory, and
    its typical epoch."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    fields_ = {key: summary[key] for key in COLUMNS if key in summary and key != "run_dir"}
    memory = summary.get("memory", {})
    fields_.update({key: max(memory[key]) for key in MEMORY_KEYS if memory.get(key)})
    return {**fields_, "status": "ok", "error": "", "epoch_seconds": epoch_seconds(run_dir)}


def epoch_seconds(run_dir: Path) -> float | None:
    """Median seconds of an epoch's training steps, leaving out the first epoch when there
    are more (it also pays the warm-up: first touches of the data and of new buffers)."""
    try:
        lines = (run_dir / METRICS).read_text().splitlines()
        seconds = [json.loads(line)["epoch_seconds"] for line in lines if line.strip()]
    except (OSError, ValueError, KeyError):
        return None
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
    if path.exists():
        return json.loads(path.read_text())
    if (out / SUMMARY).exists():
        raise UserError(f"{out} is a training run, not a sweep; draw its curves with "
                        f"`dptrain plot {out}`")
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    raise UserError(f"{out}: no {SWEEP_JSON} here; run `dptrain sweep --out {out}` first")


def grid_to_resume(out: Path) -> tuple[Grid, Config]:
    """The grid and base config of the interrupted sweep in `out`, for `--resume`."""
    if not (out / SWEEP_JSON).exists() and (out / SUMMARY).exists():
        mode = json.loads((out / SUMMARY).read_text()).get("mode", "ddp")
        raise UserError(f"--resume {out}: a training run, not a sweep; continue a training run "
                        f"with `dptrain {mode} --resume {out}`")
    meta = read_sweep(out)
    if meta.get("complete"):
        raise UserError(f"--resume {out}: this sweep is complete; nothing to resume (pass "
                        "--force with the sweep's flags to run it again)")
    config = build_config(read_toml(out / SWEEP_CONFIG), source=str(out / SWEEP_CONFIG))
    axes = tuple(parse_vary(f"{v['key']}=" + ":".join(v["values"])) for v in meta["vary"])
    return Grid(tuple(meta["modes"]), tuple(meta["nprocs"]), axes, meta["with_seq"]), config


def _outcome(row: dict) -> str:
    if row["status"] != "ok":
        return f"[red]failed[/]: {escape(row['error'])}"
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
