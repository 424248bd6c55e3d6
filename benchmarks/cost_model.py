"""Fit the cost model (dptrain/study/costmodel.py) to a width x nproc sweep and draw it.

    python benchmarks/cost_model.py SWEEP_DIR      (a `dptrain sweep --vary hidden=...` folder)

Fitted to the seq and ddp runs with n <= C (ranks that take turns on cores are drawn, not
fitted: the model has no term for it). Per-step seconds are each run's `epoch_seconds` (a
median epoch of training steps) / updates per epoch. Two processes pay when t(P, 1) > t(P, 2),
i.e. from P* = l / (c * B / 2 - 4 * s): printed, with the widths around it. Writes
cost_model.png and cost_model.json into SWEEP_DIR.

The knobs (study section 5), a separate addition below `main`'s fit:

    python benchmarks/cost_model.py SWEEP_DIR --knobs KNOB_SWEEP... --grad-sync GRAD_SYNC.json \
        --compress-cost COMPRESS_COST.json [--out DIR]

A ddp step with a knob keeps a, the compute and l, and replaces the sum's term by

    compression:  rounds * l_link + s_link * wire bytes * 2(n - 1)/n + the time to compress
    local SGD:    (l_link + s_link * 4P * 2(n - 1)/n + the parameter average) / K

with wire bytes = 4P / the compression ratio, rounds = 1 (fp16, bf16) or 3 (PowerSGD: the
uncompressed vectors, then P, then Q), the times to compress and to average fitted to
benchmarks/compress_cost.py (seconds = o + k * P per method), and a link (l_link, s_link):
this node's gloo all_reduce (fitted to benchmarks/grad_sync.py's collective rows at 2 ranks;
compression and local SGD sum through the process group), this node's shared-memory sum
(fitted to its shm rows; the fit's l and s keep what ddp pays besides it), or two nodes on an
Ethernet link (ASSUMED_LINKS). It prints the predicted against the measured ms per update of
every knob run of KNOB_SWEEP (ddp runs with n <= cores) and the width from which each knob
takes less time per update than plain ddp: on this node (the knob on gloo, plain ddp on the
shared-memory sum that auto picks; and both on shared memory, which dptrain does not offer)
and on each Ethernet link; it writes knob_model.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.study.costmodel import CostModel, fit, sweep_measurements  # noqa: E402
from dptrain.study.plots import _pyplot, _save  # noqa: E402
from dptrain.study.sweep import read_sweep  # noqa: E402


def predict(model: CostModel, params, batch: float, nproc: int, ddp: bool) -> np.ndarray:
    return np.array([model.seconds_per_update(p, batch, nproc, ddp)
                     for p in np.atleast_1d(params)])


def draw(points: list[dict], model: CostModel, out: Path) -> Path:
    cores = model.cores
    plt = _pyplot()
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    batch = points[0]["batch"]
    sizes = np.geomspace(min(p["params"] for p in points) / 2,
                         max(p["params"] for p in points) * 2, 200)
    seq = predict(model, sizes, batch, 1, False)
    runs = sorted({(p["mode"], p["nproc"]) for p in points})
    for i, (mode, n) in enumerate(runs):
        mine = sorted((p for p in points if (p["mode"], p["nproc"]) == (mode, n)),
                      key=lambda p: p["params"])
        fitted = n <= cores
        color = f"C{i}"
        line = predict(model, sizes, batch, n, mode == "ddp")
        ax_t.plot(sizes, 1e3 * line, color=color, ls="-" if fitted else ":")
        ax_t.plot([p["params"] for p in mine], [1e3 * p["step_seconds"] for p in mine], "o",
                  color=color, mfc=None if fitted else "none",
                  label=f"{mode} x{n}" + ("" if fitted else " (turn-taking: not fitted)"))
        if mode == "ddp":
            seq_at = {p["cell"]: p["step_seconds"] for p in points if p["mode"] == "seq"}
            ax_s.plot(sizes, seq / line, color=color, ls="-" if fitted else ":")
            ax_s.plot([p["params"] for p in mine], [seq_at[p["cell"]] / p["step_seconds"]
                                                    for p in mine], "o", color=color,
                      mfc=None if fitted else "none", label=f"ddp x{n}")
    ax_s.axhline(1, color="black", lw=0.8)
    where = model.crossover(batch)
    if where:
        ax_s.axvline(where, color="gray", ls="--",
                     label=f"2 ranks pay from {where / 1e3:.0f}k parameters (model)")
    ax_t.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per update",
             title=f"Time per update at global batch {batch}: measured (dots), model (lines)")
    ax_s.set(xscale="log", xlabel="parameters", ylabel="speedup per update (seq / ddp)",
             title="Speedup against seq: measured (dots), model (lines)")
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    a, c, l, s = model.coefficients
    fig.suptitle(f"t = {1e3 * a:.3g} ms + B·P/min(n,{cores}) × {1e12 * c:.3g} ps + "
                 f"{1e3 * l:.3g} ms (ddp) + 4P·2(n-1)/n bytes / {_rate(s)}")
    return _save(fig, plt, out)


def _rate(s: float) -> str:
    return "∞ GB/s" if s == 0 else f"{1e-9 / s:.3g} GB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--cores", type=int, help="the node's cores (default: the sweep's)")
    parser.add_argument("--knobs", type=Path, nargs="+",
                        help="knob sweeps (study section 5) to predict, with the two below")
    parser.add_argument("--grad-sync", type=Path, help="benchmarks/grad_sync.py's JSON")
    parser.add_argument("--compress-cost", type=Path,
                        help="benchmarks/compress_cost.py's JSON")
    parser.add_argument("--out", type=Path, help="where knob_model.json goes (default: the "
                                                 "first knob sweep)")
    args = parser.parse_args()
    if args.knobs and not (args.grad_sync and args.compress_cost):
        parser.error("--knobs needs --grad-sync and --compress-cost")
    meta = read_sweep(args.sweep_dir)
    cores = args.cores or meta.get("cores") or 1
    points = sweep_measurements(meta)
    model = fit([p for p in points if p["nproc"] <= cores], cores)
    where = model.crossover(points[0]["batch"])
    for p in points:
        p["model_seconds"] = model.seconds_per_update(p["params"], p["batch"], p["nproc"],
                                                      p["mode"] == "ddp")
    report = {**model.as_dict(), "two_ranks_pay_from_params": where, "points": points}
    (args.sweep_dir / "cost_model.json").write_text(json.dumps(report, indent=2) + "\n")
    path = draw(points, model, args.sweep_dir / "cost_model.png")
    print(f"cost model ({cores} cores): " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                      report["coefficients"].items()))
    print("  measured vs model, ms per update:")
    for p in points:
        print(f"  {p['mode']:>4} x{p['nproc']:<2} P={p['params']:>10.0f}  "
              f"{1e3 * p['step_seconds']:9.3f}  {1e3 * p['model_seconds']:9.3f}")
    print("two ranks pay from " + (f"{where:.0f} parameters" if where else "no width (model)"))
    print(f"wrote {path}")
    if args.knobs:
        knob_main(args, model.coefficients, cores)


# --- The knobs (study section 5): compression and local SGD on a link -----------------------

# Two nodes, one rank each, on Ethernet. ASSUMED, not measured: line rate as bandwidth, and the
# latency of one TCP all_reduce round between two hosts (tens of microseconds).
ASSUMED_LINKS = {"10 Gb/s Ethernet": (50e-6, 8 / 10e9), "100 Gb/s Ethernet": (20e-6, 8 / 100e9)}
ROUNDS = {"fp16": 1, "bf16": 1, "powersgd": 3}


def mlp_params(hidden: int) -> int:
    """Parameters of 784-h-h-10."""
    return 784 * hidden + hidden + hidden * hidden + hidden + 10 * hidden + 10


def width_of(params: float) -> float:
    """The h of 784-h-h-10 with `params` parameters (h^2 + 796 h + 10 = P)."""
    return (-796 + (796 ** 2 - 4 * (10 - params)) ** 0.5) / 2


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(o, k) of seconds = o + k * x, least squares on the relative error, both >= 0."""
    x = np.array([[1.0, p] for p, _ in points])
    t = np.array([s for _, s in points])
    coef, *_ = np.linalg.lstsq(x / t[:, None], np.ones_like(t), rcond=None)
    if (coef < 0).any():  # one term alone
        k = float(np.dot(x[:, 1] / t, np.ones_like(t)) / np.dot(x[:, 1] / t, x[:, 1] / t))
        o = float(np.mean(t)) if coef[1] < 0 else 0.0
        return (o, 0.0) if coef[1] < 0 else (0.0, k)
    return float(coef[0]), float(coef[1])


def sum_link(grad_sync: dict, method: str) -> tuple[float, float]:
    """(latency s, s per byte) of one sum at 2 ranks on this node by `method` ("collective":
    gloo's all_reduce; "shm": the shared-memory sum), fitted to grad_sync.json."""
    rows = [r for r in grad_sync["rows"] if r["nproc"] == 2]
    return fit_line([(4 * r["size"], r["seconds"][method]) for r in rows])


def overheads(compress_cost: dict) -> dict[str, tuple[float, float]]:
    """Per method, (o, k): the seconds compressing adds to a sum, o + k * P; and "average":
    local SGD's parameter average. Fitted to compress_cost.json."""
    rows = compress_cost["rows"]
    fitted = {name: fit_line([(r["params"], max(r["methods"][name]["overhead_seconds"], 1e-9))
                              for r in rows]) for name in rows[0]["methods"] if name != "sum"}
    fitted["average"] = fit_line([(r["params"], r["average_seconds"]) for r in rows])
    return fitted


def wire_ratio(knob: str, params: float, compress_cost: dict) -> float:
    """4P / the bytes a rank contributes: 2 for fp16 and bf16; PowerSGD's from the measured
    widths, interpolated in log P."""
    if knob in ("fp16", "bf16"):
        return 2.0
    rows = compress_cost["rows"]
    xs = np.log([r["params"] for r in rows])
    ys = np.log([r["methods"][knob]["ratio"] for r in rows])
    return float(np.exp(np.interp(np.log(params), xs, ys)))


def knob_step_seconds(coef, knob: str, params: float, batch: float, nproc: int, cores: int,
                      link: tuple[float, float], shm: tuple[float, float], fitted: dict,
                      compress_cost: dict) -> float:
    """Seconds per update of a ddp run with `knob` ("plain", "fp16", "bf16", "powersgd:R",
    "local:K") whose gradient sum runs on `link`.

    The fit's ddp terms (l + s 4P ring) hold the shared-memory sum it was fitted on, `shm`
    (its own latency and per-byte time, from grad_sync.json) and what ddp pays besides (its
    bucket bookkeeping): a knob keeps the latter and replaces the former.
    """
    a, c, l, s = coef
    ring = 2 * (nproc - 1) / nproc
    besides = a + c * batch * params / min(nproc, cores) + max(0.0, l - shm[0]) \
        + max(0.0, s - shm[1]) * 4 * params * ring
    latency, per_byte = link
    if knob == "plain":
        return besides + latency + per_byte * 4 * params * ring
    if knob.startswith("local:"):
        every = int(knob.split(":")[1])
        o, k = fitted["average"]
        return besides + (latency + per_byte * 4 * params * ring + o + k * params) / every
    o, k = fitted[knob]
    rounds = ROUNDS[knob.split(":")[0]]
    wire = 4 * params / wire_ratio(knob, params, compress_cost)
    return besides + rounds * latency + per_byte * wire * ring + o + k * params


def pays_from(coef, knob: str, batch: float, links: tuple, shm, fitted, compress_cost,
              cores: int) -> float | None:
    """The fewest parameters (from 1e4 to 1e9) from which `knob` on the first of `links` beats
    plain ddp on the second, at 2 ranks, for good (it stays ahead up to 1e9); None if it is
    behind at 1e9."""
    sizes = np.geomspace(1e4, 1e9, 400)
    knob_link, plain_link = links

    def seconds(name, p, link):
        return knob_step_seconds(coef, name, p, batch, 2, cores, link, shm, fitted,
                                 compress_cost)

    ahead = [seconds(knob, p, knob_link) < seconds("plain", p, plain_link) for p in sizes]
    if not ahead[-1]:
        return None
    last_behind = max((i for i, a in enumerate(ahead) if not a), default=-1)
    return float(sizes[last_behind + 1])


def knob_runs(sweep_dirs: list[Path], cores: int) -> list[dict]:
    """The ddp runs of the knob sweeps (n <= cores), with their knob and ms per update."""
    runs = []
    for sweep_dir in sweep_dirs:
        for r in read_sweep(sweep_dir)["runs"]:
            if r["status"] != "ok" or r["mode"] != "ddp" or r["nproc"] > cores \
                    or not r.get("epoch_seconds"):
                continue
            knob = ("plain" if r.get("grad_compress", "none") == "none" else r["grad_compress"])
            if r.get("local_sgd"):
                knob = f"local:{r['local_sgd']}"
            elif knob == "powersgd":
                from dptrain.config import POWERSGD_RANK
                knob = f"powersgd:{POWERSGD_RANK}"
            if r.get("zero") or r.get("accumulate", 1) != 1 or r.get("precision", "fp32") != "fp32":
                continue  # the model has no term for these
            runs.append({"knob": knob, "nproc": r["nproc"], "params": r["param_bytes"] / 4,
                         "batch": r["global_batch"], "grad_sync": r["grad_sync"],
                         "step_seconds": r["epoch_seconds"] / r["updates_per_epoch"],
                         "run_dir": f"{sweep_dir}/{r['run_dir']}"})
    return runs


def knob_report(coef, cores: int, batch: float, sweep_dirs: list[Path], grad_sync: dict,
                compress_cost: dict) -> dict:
    """Predicted against measured for the knob runs; per link, where each knob pays."""
    fitted = overheads(compress_cost)
    gloo, shm = sum_link(grad_sync, "collective"), sum_link(grad_sync, "shm")
    links = {"this node, shared memory": shm, "this node, gloo": gloo, **ASSUMED_LINKS}
    # (the knob's link, plain ddp's): on this node plain ddp keeps the shared-memory sum (auto)
    # while torch's hooks go through gloo; both on shared memory is what dptrain does not offer.
    pairs = {"this node (knob on gloo, plain ddp on shared memory)": (gloo, shm),
             "this node, both on shared memory (not offered)": (shm, shm),
             **{name: (link, link) for name, link in ASSUMED_LINKS.items()}}
    runs = knob_runs(sweep_dirs, cores)
    for r in runs:
        link = gloo if r["grad_sync"] == "collective" else shm
        r["model_seconds"] = knob_step_seconds(coef, r["knob"], r["params"], r["batch"],
                                               r["nproc"], cores, link, shm, fitted,
                                               compress_cost)
    knobs = ["fp16", "bf16", *(m for m in compress_cost["rows"][0]["methods"]
                               if m.startswith("powersgd")), "local:4", "local:16"]
    pays = {}
    for name, pair in pairs.items():
        pays[name] = {}
        for knob in knobs:
            where = pays_from(coef, knob, batch, pair, shm, fitted, compress_cost, cores)
            pays[name][knob] = {"params": where, "hidden": width_of(where) if where else None}
    return {"links": {k: {"latency_s": v[0], "s_per_byte": v[1]} for k, v in links.items()},
            "assumed_links": list(ASSUMED_LINKS), "overheads": fitted, "runs": runs,
            "pays_from": pays}


def _where(pays: dict) -> str:
    if pays["params"] is None:
        return "never"
    if pays["params"] <= 1e4:
        return "at every width (from 1e4 parameters)"
    return f"{pays['params']:.3g} (h {pays['hidden']:.0f})"


def knob_main(args, coef, cores: int) -> None:
    grad_sync = json.loads(args.grad_sync.read_text())
    compress_cost = json.loads(args.compress_cost.read_text())
    batch = 1024
    report = knob_report(coef, cores, batch, args.knobs, grad_sync, compress_cost)
    out = args.out or args.knobs[0]
    (out / "knob_model.json").write_text(json.dumps(report, indent=2) + "\n")
    print("knobs: measured vs model, ms per update (ddp, gradient sum as run):")
    for r in report["runs"]:
        print(f"  {r['knob']:>12} x{r['nproc']:<2} P={r['params']:>10.0f}  "
              f"{1e3 * r['step_seconds']:9.3f}  {1e3 * r['model_seconds']:9.3f}  "
              f"({100 * (r['model_seconds'] / r['step_seconds'] - 1):+.0f}%)")
    print(f"each knob beats plain ddp at 2 ranks (batch {batch}) from (parameters, hidden h of "
          "784-h-h-10):")
    for link, knobs in report["pays_from"].items():
        print(f"  {link}: " + "; ".join(f"{knob} {_where(v)}" for knob, v in knobs.items()))
    print(f"wrote {out / 'knob_model.json'}")


if __name__ == "__main__":
    main()
