"""`dptrain sweep`: one training per process count, plus a seq reference, into one folder.

Each run is a child process (`python -m dptrain <mode> ...`), so a run that fails — a bad
world size, a crashed worker — is recorded with its error line and the sweep goes on. No torch
here: the sweep process only starts runs and reads their summary.json.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from dptrain.config import Config, ConfigError, to_toml
from dptrain.errors import UserError
from dptrain.runlog import SUMMARY, write_atomic

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_CONFIG = "sweep-config.toml"
COLUMNS = ("mode", "nproc", "status", "global_batch", "updates_per_epoch", "lr", "epochs",
           "val_accuracy", "test_accuracy", "test_loss", "train_seconds", "wall_seconds",
           "speedup", "efficiency", "wall_speedup", "wall_efficiency", "run_dir", "error")
SWEEP_MODES = ("ddp", "fsdp")
INTERRUPTED = 130


class SweepInterrupted(Exception):
    """Ctrl-C reached a run: the sweep stops after writing what it has."""


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


def check_sweep_dir(out: Path, force: bool) -> None:
    """Refuse a folder that holds a finished sweep, unless forced; an interrupted one is reused
    (its finished runs are refused one by one, as a run folder is)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    path = out / SWEEP_JSON
    if path.exists() and json.loads(path.read_text()).get("complete") and not force:
        raise UserError(f"--out {out} already holds a finished sweep ({SWEEP_JSON}); choose "
                        "another folder, or pass --force to replace it")


def run_sweep(mode: str, nprocs: list[int], config: Config, out: Path, *, with_seq: bool,
              force: bool, echo=print) -> list[dict[str, Any]]:
    """Run seq (optional) then `mode` at each count; write sweep.csv/json; return the rows."""
    if mode not in SWEEP_MODES:
        raise ConfigError(f"--mode: expected one of {', '.join(SWEEP_MODES)}, got {mode!r}")
    check_sweep_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    # Every run reads this one resolved file, so all of them train the same config.
    config_file = out / SWEEP_CONFIG
    config_file.write_text(to_toml(replace(config, run=replace(config.run, out=""))))
    plan = ([("seq", 1)] if with_seq else []) + [(mode, n) for n in nprocs]
    started, rows = time.time(), []
    try:
        for run_mode, nproc in plan:
            echo(f"sweep: {run_mode} x {nproc} ...")
            rows.append(run_one(run_mode, nproc, config_file, out, force=force))
            echo(f"sweep: {run_mode} x {nproc}: {_outcome(rows[-1])}")
    finally:  # an interrupted sweep still leaves the rows it finished
        add_speedups(rows)
        write_results(out, rows, {"mode": mode, "nprocs": nprocs, "with_seq": with_seq,
                                  "seconds": time.time() - started,
                                  "complete": len(rows) == len(plan)})
    return rows


def run_one(mode: str, nproc: int, config_file: Path, out: Path, *, force: bool) -> dict:
    """One training as a child process; its output goes to <run>.log beside the run folder."""
    run_dir = out / f"{mode}-{nproc}"
    argv = [sys.executable, "-m", "dptrain", mode, "--config", str(config_file),
            "--out", str(run_dir)]
    argv += ["--nproc", str(nproc)] if mode != "seq" else []
    argv += ["--force"] if force else []
    started = time.time()
    with open(out / f"{mode}-{nproc}.log", "w") as log:
        child = subprocess.run(argv, stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(child.stderr)
    if child.returncode in (INTERRUPTED, -2):
        raise SweepInterrupted(f"{mode} x {nproc} was interrupted")
    row = {"mode": mode, "nproc": nproc, "run_dir": run_dir.name}
    summary_path = run_dir / SUMMARY
    if child.returncode != 0 or not summary_path.exists():
        return {**row, "status": "failed", "wall_seconds": time.time() - started,
                "error": error_line(child.stderr, child.returncode)}
    summary = json.loads(summary_path.read_text())
    return {**row, "status": "ok", "error": "",
            **{key: summary[key] for key in COLUMNS if key in summary and key not in row}}


def error_line(stderr: str, returncode: int) -> str:
    """The child's own error line, else its last line of output, else its exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("dptrain: error: "):
            return line.removeprefix("dptrain: error: ")
    return lines[-1] if lines else f"exit status {returncode}"


def add_speedups(rows: list[dict]) -> None:
    """speedup = seq seconds / run seconds; efficiency = speedup / nproc (train and wall time)."""
    seq = next((r for r in rows if r["mode"] == "seq" and r["status"] == "ok"), None)
    for row in rows:
        for prefix, key in (("", "train_seconds"), ("wall_", "wall_seconds")):
            ok = seq is not None and row["status"] == "ok" and row.get(key)
            speedup = seq[key] / row[key] if ok else None
            row[f"{prefix}speedup"] = speedup
            row[f"{prefix}efficiency"] = speedup / row["nproc"] if ok else None


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """sweep.json (meta + rows) and sweep.csv (one row per run, COLUMNS, blanks for missing)."""
    def write_csv(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
        f.write(text.getvalue().encode())

    write_atomic(out / SWEEP_CSV, write_csv)
    payload = json.dumps({**meta, "runs": rows}, indent=2) + "\n"
    write_atomic(out / SWEEP_JSON, lambda f: f.write(payload.encode()))


def read_sweep(out: Path) -> dict:
    """sweep.json of a finished sweep; a folder without one is a UserError."""
    path = Path(out) / SWEEP_JSON
    if not path.exists():
        raise UserError(f"{out}: no {SWEEP_JSON} here; run `dptrain sweep --out {out}` first")
    return json.loads(path.read_text())


def _outcome(row: dict) -> str:
    if row["status"] != "ok":
        return f"[red]failed[/]: {escape(row['error'])}"
    return (f"test accuracy {row['test_accuracy']:.4f}, train {row['train_seconds']:.1f} s, "
            f"wall {row['wall_seconds']:.1f} s")


def sweep_table(rows: list[dict]):
    """The sweep as a rich table, one line per run; sweep.csv has every column."""
    from rich import box
    from rich.table import Table

    table = Table(title="dptrain sweep", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    headers = ("mode", "nproc", "batch", "upd/ep", "lr", "test acc", "train s", "wall s",
               "speedup", "eff")
    for header in headers:
        table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True,
                         min_width=len(header))
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["mode"], str(r["nproc"]), "[red]failed[/]")
            continue
        table.add_row(r["mode"], str(r["nproc"]), str(r["global_batch"]),
                      str(r["updates_per_epoch"]), f"{r['lr']:.4g}", f"{r['test_accuracy']:.4f}",
                      f"{r['train_seconds']:.2f}", f"{r['wall_seconds']:.2f}",
                      _num(r["speedup"]), _num(r["efficiency"]))
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"

