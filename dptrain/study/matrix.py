"""`dptrain matrix`: what each knob changes, run by run, against seq fp32.

For every finished run of one or more sweeps, the reference is a seq run with every knob at
its default ("seq fp32") and otherwise the same computation: the same model, data split,
optimizer, lr rule, global batch and seed (KNOBS, and the settings of `IGNORED`, may differ).
Each run gets

- the largest parameter difference from the reference's model.pt, and a verdict:
  `identical` (bit for bit), `round-off` (no larger than ROUND_OFF x what a plain ddp run of
  the same computation, which only sums the same gradients in another order, shows; else
  FALLBACK_ATOL), or `differs`;
- its test-accuracy difference from the reference, and whether that lies inside the seed
  band: no larger (either way) than the spread (largest - smallest) of the test accuracies of
  the seq runs that differ from the reference only in their seed (`--vary seed=0,1,2,3,4` on a
  seq sweep gives five), i.e. no more than changing the seed moves it;
- the largest parameter difference from the plain ddp run (every knob at its default) of the
  same computation, mode and nproc, if there is one: 0 where a knob changes nothing computed;
- its cost: milliseconds per update (its epoch_seconds, a median epoch, per update), the time
  saved against the reference (1 - ms / reference ms), the model-state bytes (parameters,
  gradients, optimizer state) and the peak RSS of its largest rank.

Written as matrix.csv and matrix.md, with one figure (study/plots.py: matrix_figure).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dptrain.config import Config, build_config, read_toml
from dptrain.errors import UserError
from dptrain.storage.runlog import read_summary, write_atomic
from dptrain.study.sweep import read_sweep

# The knobs, and their defaults: what a run may change against its seq fp32 reference.
# (accumulate and precision are train's; the others ddp's. A config without a key has it at
# its default.)
KNOBS = {"accumulate": 1, "precision": "fp32", "grad_compress": "none", "local_sgd": 0,
         "zero": False}
# Settings of a knob, shown with it, meaningless without it.
KNOB_SETTINGS = {"grad_compress": ("powersgd_warmup",), "local_sgd": ("local_sgd_warmup",)}
# Config sections and keys that never change what a run computes (or are the mode's own).
IGNORED_SECTIONS = ("system", "launch", "run", "ddp")
IGNORED = {("data", "data_dir"), ("train", "eval_batch_size")}
# A run is round-off when its largest parameter difference from seq is no more than this
# times the largest one of a plain ddp run of the same computation (the same gradients summed
# in another order, nothing else changed: the parity guarantee's round-off, as Adam amplifies
# it on weights whose gradient is almost always zero). Twice: another order of the same sums
# lands anywhere within about the same distance.
ROUND_OFF = 2.0
# Without such a run: the parity tests' tolerance after one epoch (tests/test_parity.py).
FALLBACK_ATOL = 1e-4
COLUMNS = ("knob", "mode", "nproc", "reference", "max_param_diff", "rel_l2_diff", "verdict",
           "round_off_limit", "plain_param_diff", "test_accuracy", "reference_accuracy",
           "accuracy_diff", "band_low", "band_high", "seed_spread", "band_runs", "in_band",
           "ms_per_update",
           "reference_ms_per_update", "time_saved", "model_state_bytes", "peak_rss_bytes",
           "run_dir")


def load_runs(sweep_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every finished run of the sweeps: its sweep row, summary, config tree and folder."""
    runs = []
    for sweep_dir in sweep_dirs:
        for row in read_sweep(sweep_dir)["runs"]:
            if row["status"] != "ok":
                continue
            folder = Path(sweep_dir) / row["run_dir"]
            config = asdict(build_config(read_toml(folder / "config.toml"),
                                         source=str(folder / "config.toml")))
            runs.append({"row": row, "folder": folder, "config": config,
                         "summary": read_summary(folder)})
    if not runs:
        raise UserError(f"no finished runs in {', '.join(map(str, sweep_dirs))}")
    return runs



def knob_values(config: dict) -> dict[str, Any]:
    """The knobs a run's config sets away from their defaults, with their settings where
    those are not at their defaults either."""
    defaults = {key: value for section in asdict(Config()).values()
                for key, value in section.items()}
    flat = {key: value for section in config.values() for key, value in section.items()}
    changed = {}
    for knob, default in KNOBS.items():
        if flat.get(knob, default) != default:
            changed[knob] = flat[knob]
            changed.update({s: flat[s] for s in KNOB_SETTINGS.get(knob, ())
                            if s in flat and flat[s] != defaults.get(s)})
    return changed


def computation(config: dict, *, seed: bool = True) -> tuple:
    """What must match between a run and its reference (the seed too, unless told not)."""
    return tuple(sorted(
        (section, key, json.dumps(value)) for section, values in config.items()
        if section not in IGNORED_SECTIONS for key, value in values.items()
        if (section, key) not in IGNORED and key not in KNOBS and (seed or key != "seed")))


def label(run: dict) -> str:
    knobs = knob_values(run["config"])
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "none"


def build_matrix(runs: list[dict]) -> list[dict[str, Any]]:
    """One row per run that has a reference (the references themselves and their seed band
    are not rows)."""
    import torch

    plain = [r for r in runs if not knob_values(r["config"])]
    references = {computation(r["config"]): r for r in plain if r["row"]["mode"] == "seq"}
    models: dict[Path, dict] = {}

    def model(run):
        if run["folder"] not in models:
            models[run["folder"]] = load_model_state(run)
        return models[run["folder"]]

    def difference(run, ref) -> tuple[float, float, bool]:
        a, b = model(run), model(ref)  # the same computation: the same model shape
        deltas = [(a[k].double() - b[k].double()) for k in a]
        largest = max(float(d.abs().max()) for d in deltas)
        norm = sum(float((b[k].double() ** 2).sum()) for k in b) ** 0.5
        rel = sum(float((d ** 2).sum()) for d in deltas) ** 0.5 / norm if norm else 0.0
        return largest, rel, all(torch.equal(a[k], b[k]) for k in a)

    limits = {}
    for key, ref in references.items():
        twins = [difference(r, ref)[0] for r in plain
                 if r["row"]["mode"] != "seq" and computation(r["config"]) == key]
        limits[key] = ROUND_OFF * max(twins) if twins and max(twins) > 0 else FALLBACK_ATOL
    rows = []
    for run in runs:
        key = computation(run["config"])
        ref = references.get(key)
        if ref is None or run is ref:
            continue
        if run["row"]["mode"] == "seq" and not knob_values(run["config"]):
            continue  # the reference again (another cell's copy of it)
        band = list({r["config"]["train"]["seed"]: r["summary"]["test_accuracy"]
                     for r in plain if r["row"]["mode"] == "seq" and computation(
                         r["config"], seed=False) == computation(ref["config"], seed=False)
                     }.values())
        largest, rel, same = difference(run, ref)
        twin = next((r for r in plain if r["row"]["mode"] == run["row"]["mode"]
                     and r["row"]["nproc"] == run["row"]["nproc"]
                     and computation(r["config"]) == key), None)
        verdict = "identical" if same else "round-off" if largest <= limits[key] else "differs"
        accuracy, ref_accuracy = run["summary"]["test_accuracy"], ref["summary"]["test_accuracy"]
        ms, ref_ms = ms_per_update(run), ms_per_update(ref)
        low, high = min(band) - ref_accuracy, max(band) - ref_accuracy
        spread = high - low
        rows.append({
            "knob": label(run), "mode": run["row"]["mode"], "nproc": run["row"]["nproc"],
            "reference": str(ref["folder"]), "max_param_diff": largest, "rel_l2_diff": rel,
            "verdict": verdict, "round_off_limit": limits[key],
            "plain_param_diff": difference(run, twin)[0] if twin else None,
            "test_accuracy": accuracy, "reference_accuracy": ref_accuracy,
            "accuracy_diff": accuracy - ref_accuracy, "band_low": low, "band_high": high,
            "seed_spread": spread, "band_runs": len(band),
            "in_band": abs(accuracy - ref_accuracy) <= spread if len(band) > 1 else None,
            "ms_per_update": ms, "reference_ms_per_update": ref_ms,
            "time_saved": 1 - ms / ref_ms if ms and ref_ms else None,
            "model_state_bytes": state_bytes(run["summary"]),
            "peak_rss_bytes": max(run["summary"]["memory"]["peak_rss_bytes"]),
            "run_dir": str(run["folder"]), "width": _width(run["config"])})
    if not rows:
        raise UserError("no run has a seq reference with every knob at its default, the same "
                        "global batch and seed (sweep with the seq reference, or add a seq "
                        "sweep's folder)")
    return rows


def load_model_state(run: dict) -> dict:
    """A run's model.pt, checked against the model its config.toml describes (weights_only,
    bounded, finite: storage/statecheck.py); safeload.LoadError in one line if not."""
    from dptrain.components.model import MLP
    from dptrain.storage.safeload import ARCHIVE_OVERHEAD, LoadError, torch_load
    from dptrain.storage.statecheck import check_state, tensor_bytes

    shape = run["config"]["model"]
    expected = MLP(tuple(shape["hidden"]), shape["activation"]).state_dict()
    path = run["folder"] / "model.pt"
    state = torch_load(path, max_bytes=tensor_bytes(expected) + ARCHIVE_OVERHEAD)
    try:
        check_state(state, expected)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    return state


def ms_per_update(run: dict) -> float | None:
    seconds = run["row"].get("epoch_seconds")
    return 1e3 * seconds / run["row"]["updates_per_epoch"] if seconds else None


def state_bytes(summary: dict) -> int:
    """The largest rank's parameters, gradients and optimizer state, in bytes."""
    memory = summary["memory"]
    return max(sum(values) for values in zip(memory["param_bytes"], memory["grad_bytes"],
                                             memory["optimizer_bytes"]))


def _width(config: dict) -> str:
    return ",".join(map(str, config["model"]["hidden"]))


def write_matrix(rows: list[dict], out: Path) -> list[Path]:
    """matrix.csv, matrix.md and matrix.png in `out`; returns their paths."""
    from dptrain.study.plots import matrix_figure

    out.mkdir(parents=True, exist_ok=True)

    def write_csv(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if r[k] is None else r[k] for k in COLUMNS} for r in rows)
        f.write(text.getvalue().encode())

    write_atomic(out / "matrix.csv", write_csv)
    text = markdown(rows)
    write_atomic(out / "matrix.md", lambda f: f.write(text.encode()))
    return [out / "matrix.csv", out / "matrix.md", matrix_figure(rows, out / "matrix.png")]


def markdown(rows: list[dict]) -> str:
    """The matrix as a Markdown table (one line per run)."""
    head = ("| hidden | knob | mode × n | max \\|Δθ\\| vs seq | verdict | vs plain ddp | test acc "
            "| Δ acc | seed spread (runs) | in band | ms/update | time saved | state MB/rank "
            "| peak RSS MB/rank |")
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in rows:
        band = f"±{r['seed_spread']:.4f} ({r['band_runs']})" if r["band_runs"] > 1 else "-"
        lines.append(
            f"| {r['width']} | {r['knob']} | {r['mode']} × {r['nproc']} | "
            f"{r['max_param_diff']:.2g} | {r['verdict']} | {_num(r['plain_param_diff'], '.2g')} | "
            f"{r['test_accuracy']:.4f} | "
            f"{r['accuracy_diff']:+.4f} | {band} | {_yes_no(r['in_band'])} | "
            f"{_num(r['ms_per_update'], '.3g')} | {_num(r['time_saved'], '+.0%')} | "
            f"{r['model_state_bytes'] / 1e6:.3g} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _yes_no(value) -> str:
    return "-" if value is None else "yes" if value else "no"
