"""`dptrain plan`: how many processes and what global batch, predicted before training.

Two models, both measured on this machine for this model:
- seconds per update from the cost model (costmodel.py), its four constants fitted to a few
  timed updates of seq and of ddp x2 at the configured width and at a second one (measure.py);
- updates to reach the target from the gradient noise scale (components/noise.py), McCandlish
  et al. 2018: S(B) = S_min * (1 + B_noise / B), calibrated on one short real run at the
  configured batch B0 (ddp x2, which measures B_noise for free): it reached the target after S0
  updates, with B_noise measured in the epoch it did, so S_min = S0 / (1 + B_noise / B0).
Their product is the predicted time to the target of every (process count, global batch), with
the configured lr rule; the fastest that fits in memory is the recommendation.

One thread per process (as STUDY.md section 2 measured the cost model) unless --threads says
otherwise; the recommendation says so too. The plan's folder holds plan.json (every measured
constant and prediction; `--constants` reuses the constants on the same machine), the
calibration run and its log.
"""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

from dptrain.components.memory import (available_bytes, parameter_count, require_memory,
                                       training_memory)
from dptrain.config import Config, cpu_cores, resolve, to_toml
from dptrain.errors import UserError
from dptrain.storage.runlog import read_json
from dptrain.study.costmodel import CostModel, VM_2CORE, fit

PLAN_JSON = "plan.json"
BATCH_FACTORS = (0.25, 0.5, 1, 2, 4, 8, 16)
# A first epoch's crossing is interpolated from chance (10 classes) at update 0.
CHANCE = 0.1
CALIBRATION_NPROC = 2
# Target mode: the calibration run stops at the target or the budget, long before these.
TARGET_MODE_EPOCHS = 10_000
# A second width for the cost model's compute term: 4x wider below this many parameters, else
# 4x narrower (a wide model's timed updates would cost seconds each).
WIDEN_BELOW = 200_000


# --- memory ---------------------------------------------------------------------------------

def memory_per_rank(config: Config, hidden, batch: int, nproc: int, mode: str,
                    baseline: int) -> int:
    """Predicted peak resident bytes of one rank: `baseline` (the process itself: torch, the
    mapped data; measured by the plan) + the model's memory as components/memory.py estimates
    it for a run (parameters, gradients, optimizer state, activations; fsdp's shards and its
    gathered layer). STUDY.md section 6 compares it with measured peaks."""
    from dptrain.study.measure import with_width

    estimate = training_memory(with_width(config, hidden), mode="seq" if nproc == 1 else mode,
                               world_size=nproc, global_batch=batch)
    return baseline + estimate.total


def current_rss() -> int:
    """This process's resident bytes now (the baseline of a rank before its model exists)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- the noise-scale model of updates -------------------------------------------------------

def updates_to_reach(records: list[dict], target: float, updates_per_epoch: int) -> float | None:
    """Updates until the validation accuracy first reaches `target`, interpolated linearly
    within the epoch it did (from CHANCE at update 0 for the first epoch); None if never."""
    before = CHANCE
    for epoch, record in enumerate(records):
        accuracy = record["val_accuracy"]
        if accuracy >= target:
            fraction = 1.0 if accuracy == before else (target - before) / (accuracy - before)
            return (epoch + min(max(fraction, 0.0), 1.0)) * updates_per_epoch
        before = accuracy
    return None


def noise_scale_at(records: list[dict], updates: float, updates_per_epoch: int) -> float | None:
    """B_noise of the epoch in which `updates` falls (the last earlier one that has it)."""
    epoch = min(len(records), max(1, math.ceil(updates / updates_per_epoch)))
    for record in reversed(records[:epoch]):
        if "noise_scale" in record:
            return record["noise_scale"]
    return None


def predicted_updates(s_min: float, b_noise: float, batch: float) -> float:
    """S(B) = S_min (1 + B_noise / B): McCandlish et al. 2018, eq. 2.11."""
    return s_min * (1 + b_noise / batch)


# --- the plan -------------------------------------------------------------------------------

def this_machine(config: Config) -> dict:
    import torch

    return {"host": socket.gethostname(), "cores": cpu_cores(), "torch": torch.__version__,
            "device": config.system.device, "threads": config.system.threads}


def second_width(hidden) -> tuple[int, ...]:
    if parameter_count(hidden) < WIDEN_BELOW:
        return tuple(4 * h for h in hidden)
    return tuple(max(1, h // 4) for h in hidden)


def measure_constants(config: Config, mnist, split, cores: int, max_nproc: int,
                      echo) -> dict:
    """The cost model's constants from timed updates of seq and ddp x2 at two widths."""
    from dptrain.study import measure

    widths = [tuple(config.model.hidden), second_width(config.model.hidden)]
    configs = [measure.with_width(config, w) for w in widths]
    batch = config.train.batch_size if not config.train.full_batch else len(split.train)
    guess = {n: [VM_2CORE.seconds_per_update(parameter_count(w), batch, n) for w in widths]
             for n in (1, 2)}
    started = time.monotonic()
    echo(f"timing updates: seq at hidden {_text(widths[0])} and {_text(widths[1])}")
    seq = measure.time_seq(configs, guess[1], mnist, split)
    points = [{"mode": "seq", "nproc": 1, "hidden": list(w), "params": parameter_count(w),
               "batch": batch, "step_seconds": s} for w, s in zip(widths, seq)]
    # Baselines: a process's peak less what the model says its widest timed model held. The
    # seq process holds torch and the CLI itself; forked ddp workers share those pages.
    from dptrain.storage.runlog import peak_rss_bytes

    widest = max(widths, key=parameter_count)
    baselines = {"seq": peak_rss_bytes() - memory_per_rank(config, widest, batch, 1, "seq", 0)}
    if max_nproc >= 2:
        echo("timing updates: ddp x2 at the same widths")
        ddp, worker_rss = measure.time_ddp(configs, guess[2], 2)
        points += [{"mode": "ddp", "nproc": 2, "hidden": list(w), "params": parameter_count(w),
                    "batch": batch, "step_seconds": s} for w, s in zip(widths, ddp)]
        baselines["ddp"] = worker_rss - memory_per_rank(config, widest, batch, 2, "ddp", 0)
    return {"cost_model": fit(points, cores).as_dict(), "points": points,
            "baseline_rss_bytes": baselines, "seconds": time.monotonic() - started}


def load_constants(path: Path, machine: dict) -> dict:
    """The constants of an earlier plan.json (or its folder), if measured on this machine."""
    path = path / PLAN_JSON if path.is_dir() else path
    try:
        earlier = read_json(path)
        constants, theirs = earlier["constants"], earlier["machine"]
        CostModel.from_dict(constants["cost_model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--constants {path}: not a plan.json of `dptrain plan` "
                        f"({type(e).__name__}: {e})") from None
    differ = [f"{k} {theirs.get(k)!r} here {v!r}" for k, v in machine.items()
              if theirs.get(k) != v]
    if differ:
        raise UserError(f"--constants {path} were measured elsewhere ({'; '.join(differ)}); "
                        "plan without --constants to measure this machine")
    return {**constants, "reused_from": str(path), "seconds": 0.0}


def calibrate(config: Config, out: Path, target: float | None, budget: float, n_train: int,
              echo) -> dict:
    """The short real run at the configured batch, and what it says: the updates S0 to the
    target, B_noise where it got there, S_min."""
    from dptrain.study import measure

    plan0 = resolve(config, mode="ddp", world_size=CALIBRATION_NPROC, n_train=n_train)
    epochs = TARGET_MODE_EPOCHS if target is not None else config.train.epochs
    goal = f"val accuracy {target}" if target is not None else f"{epochs} epochs"
    echo(f"calibration: ddp x{CALIBRATION_NPROC} at batch {plan0.global_batch} until {goal}, "
         f"at most {budget:g} s")
    # The noise scale at every update, whatever the config says: B_noise sets S_min, and
    # reading fewer updates (--noise-every) would multiply its error by 2-3 where its cost
    # does not matter.
    every_update = replace(config, run=replace(config.run, noise_scale=True, noise_every=1))
    (out / "config.toml").write_text(to_toml(every_update))
    run = measure.train_until(out / "config.toml", out / "calibration", mode="ddp",
                              nproc=CALIBRATION_NPROC, epochs=epochs, target=target,
                              budget=budget, log=out / "calibration.log")
    records, per_epoch = run["records"], plan0.updates_per_epoch
    run_name = f"the calibration run (ddp x{CALIBRATION_NPROC}, batch {plan0.global_batch})"
    reached = (f"reached val accuracy {max(r['val_accuracy'] for r in records):.4f} in "
               f"{len(records)} epoch(s) ({len(records) * per_epoch} updates)" if records
               else "finished no epoch")
    if target is None:
        if len(records) < epochs:
            raise UserError(f"{run_name} {reached} within --budget {budget:g} s, short of "
                            f"--epochs {epochs}; raise --budget, or lower --epochs")
        target = records[-1]["val_accuracy"]
    if updates_to_reach(records, target, per_epoch) is None:
        raise UserError(f"{run_name} {reached} within --budget {budget:g} s, short of "
                        f"--target-accuracy {target}; raise --budget, or aim lower")
    model = noise_model(records, target, plan0.global_batch, per_epoch)
    if model is None:
        raise UserError("the calibration run measured no noise scale (every epoch's |G|^2 "
                        "estimate was <= 0: the gradient is all noise); train longer: --budget")
    return {**run, "batch": plan0.global_batch, "updates_per_epoch": per_epoch,
            "target": target, **model}


def noise_model(records: list[dict], target: float, batch: int,
                updates_per_epoch: int) -> dict | None:
    """S0 (updates to `target` at `batch`), B_noise of the epoch that reached it, and
    S_min = S0 / (1 + B_noise / batch); None if the target or a noise scale is missing."""
    s0 = updates_to_reach(records, target, updates_per_epoch)
    b_noise = noise_scale_at(records, s0, updates_per_epoch) if s0 is not None else None
    if b_noise is None:
        return None
    return {"updates_to_target": s0, "noise_scale": b_noise,
            "s_min": s0 / (1 + b_noise / batch)}


def batches(config: Config, n_train: int) -> list[int]:
    """The candidate global batches: BATCH_FACTORS x the configured, within [1, n_train]."""
    b0 = n_train if config.train.full_batch else config.train.batch_size
    return sorted({min(n_train, max(1, round(b0 * f))) for f in BATCH_FACTORS})


def predict(config: Config, model: CostModel, calibration: dict, n_train: int,
            max_nproc: int, baselines: dict[str, int], available: int | None) -> list[dict]:
    """A row per (process count, global batch); `baselines`: a seq process's and a worker's
    resident bytes before its model (memory_per_rank)."""
    params = parameter_count(config.model.hidden)
    rows = []
    for nproc in range(1, max_nproc + 1):
        for batch in batches(config, n_train):
            if batch < nproc:
                continue
            candidate = _with_batch(config, batch)
            plan = resolve(candidate, mode="seq" if nproc == 1 else "ddp", world_size=nproc,
                           n_train=n_train)
            updates = predicted_updates(calibration["s_min"], calibration["noise_scale"], batch)
            seconds = model.seconds_per_update(params, batch, nproc)
            baseline = baselines["seq" if nproc == 1 else "ddp"]
            memory = {mode: memory_per_rank(config, config.model.hidden, batch, nproc, mode,
                                            baseline) for mode in ("ddp", "fsdp")}
            fits = available is None or memory["ddp"] * nproc <= available
            rows.append({"nproc": nproc, "batch": batch, "lr": plan.lr,
                         "seconds_per_update": seconds, "updates": updates,
                         "epochs": max(1, math.ceil(updates / plan.updates_per_epoch)),
                         "seconds_to_target": updates * seconds,
                         "ddp_bytes_per_rank": memory["ddp"],
                         "fsdp_bytes_per_rank": memory["fsdp"],
                         "fits": fits,
                         "turn_taking": nproc > model.cores})
    return rows


def _with_batch(config: Config, batch: int) -> Config:
    return replace(config, train=replace(config.train, batch_size=batch, full_batch=False))


def recommend(rows: list[dict], config: Config, calibration: dict) -> dict:
    """The fastest predicted row that fits (ranks beyond the cores only if nothing else
    does: the model cannot see their turn-taking), as a command and a reason."""
    fitting = [r for r in rows if r["fits"]] or rows
    trusted = [r for r in fitting if not r["turn_taking"]] or fitting
    best = min(trusted, key=lambda r: r["seconds_to_target"])
    b0 = calibration["batch"]
    reason = (f"fastest predicted to val accuracy {calibration['target']:.4f}: "
              f"{best['updates']:.0f} updates (noise scale {calibration['noise_scale']:.0f} "
              f"samples: batch {best['batch']} needs {best['updates'] / _updates_at(rows, b0):.2f}x"
              f" the updates of {b0}) at {1e3 * best['seconds_per_update']:.3g} ms each")
    others = [r for r in trusted if r["batch"] == best["batch"] and r["nproc"] != best["nproc"]]
    if others:
        other = min(others, key=lambda r: r["seconds_per_update"])
        reason += (f", {other['seconds_per_update'] / best['seconds_per_update']:.2f}x faster "
                   f"per update than {other['nproc']} process(es)")
    return {**best, "command": command_line(config, best["nproc"], best["batch"], best["epochs"]),
            "reason": reason}


def _updates_at(rows: list[dict], batch: int) -> float:
    return next(r["updates"] for r in rows if r["batch"] == batch)


def command_line(config: Config, nproc: int, batch: int, epochs: int) -> str:
    """The exact `dptrain` command of a row: the config's values that differ from the
    built-in defaults as flags, then the row's process count, batch and epochs."""
    default = Config()
    mode = "seq" if nproc == 1 else "ddp"
    words = ["dptrain", mode] + ([f"--nproc {nproc}"] if nproc > 1 else [])
    sections = ["model", "data", "optim", "train", "system"]
    skip = {"batch_size", "full_batch", "epochs"}
    if nproc == 1:
        skip |= {"backend", "timeout", "grad_sync"}
    if config.optim.lr_scaling == "none":
        skip |= {"ref_batch_size", "warmup_epochs"}
    for section in sections:
        mine, theirs = asdict(getattr(config, section)), asdict(getattr(default, section))
        for key, value in mine.items():
            if key in skip or value == theirs[key]:
                continue
            words.append(_flag(key, value))
    words += [f"--batch-size {batch}", f"--epochs {epochs}"]
    return " ".join(words)


def _flag(key: str, value) -> str:
    import shlex

    name = "--" + key.replace("_", "-")
    if key == "drop_last":
        return "--drop-last" if value else "--keep-last"
    if isinstance(value, bool):
        return name
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"{name} {shlex.quote(str(value))}"


def _text(hidden) -> str:
    return ",".join(map(str, hidden))


def make_plan(config: Config, *, target: float | None, max_nproc: int | None, budget: float,
              out: Path, constants_from: Path | None, echo=print) -> dict:
    """Measure, calibrate, predict and recommend; writes out/plan.json and returns it."""
    started = time.monotonic()
    from dptrain.components.data import load_mnist, split_indices

    # One thread per process unless asked: the cost model's compute term assumes it.
    config = replace(config, system=replace(config.system, threads=config.system.threads or 1))
    mnist = load_mnist(config.data.data_dir)
    split = split_indices(len(mnist.labels), config.data.split_seed)
    n_train = len(split.train)
    reference = resolve(config, mode="seq", world_size=1, n_train=n_train)
    # Refused as `dptrain seq` would refuse it, before anything is allocated: the plan times
    # one replica in this process.
    require_memory(training_memory(config, mode="seq", world_size=1,
                                   global_batch=reference.global_batch), config, what="plan")
    available, baseline = available_bytes(), current_rss()
    cores = cpu_cores()
    max_nproc = max_nproc or cores
    machine = this_machine(config)
    out.mkdir(parents=True, exist_ok=True)
    constants = (load_constants(constants_from, machine) if constants_from else
                 measure_constants(config, mnist, split, cores, max_nproc, echo))
    measured = constants.get("baseline_rss_bytes") or {}
    baselines = {"seq": measured.get("seq", baseline)}
    baselines["ddp"] = measured.get("ddp", baselines["seq"])
    model = CostModel.from_dict(constants["cost_model"])
    calibration = calibrate(config, out, target, budget, n_train, echo)
    rows = predict(config, model, calibration, n_train, max_nproc, baselines, available)
    plan = {"machine": machine, "available_memory_bytes": available,
            "config": json.loads(json.dumps(asdict(config))), "constants": constants,
            "calibration": {k: v for k, v in calibration.items()},
            "rows": rows, "recommendation": recommend(rows, config, calibration)}
    plan["seconds"] = {"constants": constants["seconds"], "calibration": calibration["seconds"],
                       "total": time.monotonic() - started}
    (out / PLAN_JSON).write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def plan_table(plan: dict):
    """The rows as a rich Table, the recommended one in bold."""
    from rich.table import Table

    calibration, best = plan["calibration"], plan["recommendation"]
    table = Table(title=f"to val accuracy {calibration['target']:.4f}: noise scale "
                        f"{calibration['noise_scale']:.0f} samples, S_min "
                        f"{calibration['s_min']:.0f} updates")
    for column in ("nproc", "batch", "lr", "ms/update", "updates", "epochs", "s to target",
                   "ddp MB/rank", "fsdp MB/rank"):
        table.add_column(column, justify="right")
    for r in plan["rows"]:
        mark = "bold" if (r["nproc"], r["batch"]) == (best["nproc"], best["batch"]) else \
            "dim" if not r["fits"] or r["turn_taking"] else ""
        table.add_row(str(r["nproc"]), str(r["batch"]), f"{r['lr']:.3g}",
                      f"{1e3 * r['seconds_per_update']:.3g}", f"{r['updates']:.0f}",
                      str(r["epochs"]), f"{r['seconds_to_target']:.3g}",
                      f"{r['ddp_bytes_per_rank'] / 2**20:.0f}" + ("" if r["fits"] else " (no)"),
                      f"{r['fsdp_bytes_per_rank'] / 2**20:.0f}", style=mark)
    return table
