"""A cost model of a training step, fitted to a width x nproc sweep, drawn against it.

    python benchmarks/cost_model.py SWEEP_DIR      (a `dptrain sweep --vary hidden=...` folder)

Seconds per update of a run with P parameters, global batch B and n ranks on a node of C cores:

    t = a                        fixed per-step cost (Python, dispatch, the optimizer's loop)
      + c * B * P / min(n, C)    compute: every sample touches every parameter, split over ranks
                                 (ranks beyond the cores take turns, so they divide by C)
      + l * [ddp]                the sum's fixed cost: DDP's bookkeeping and the ranks' waits
      + s * 4P * 2(n - 1) / n    the all-reduce: the bytes a rank moves in a ring or in a
                                 reduce-scatter + all-gather (none for one rank)

fitted by least squares on the relative error, coefficients >= 0, to the seq and ddp runs
with n <= C (ranks that take turns on cores are drawn, not fitted: the model has no term for
it). Per-step seconds are each run's `epoch_seconds` (a median epoch of training steps) /
updates per epoch. Two processes pay when t(P, 1) > t(P, 2), i.e. from
P* = l / (c * B / 2 - 4 * s): printed, with the widths around it. Writes cost_model.png and
cost_model.json into SWEEP_DIR.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.study.plots import _pyplot, _save  # noqa: E402
from dptrain.study.sweep import read_sweep  # noqa: E402

TERMS = ("fixed s/step", "compute s per sample-parameter", "ddp fixed s/step",
         "all-reduce s/byte")


def features(params: float, batch: float, nproc: int, cores: int, ddp: bool) -> list[float]:
    return [1.0, batch * params / min(nproc, cores), float(ddp),
            4 * params * 2 * (nproc - 1) / nproc]


def measurements(meta: dict) -> list[dict]:
    """Per-step seconds of every finished seq and ddp run, with its parameter count."""
    rows = [r for r in meta["runs"] if r["status"] == "ok" and r.get("epoch_seconds")]
    params = {r["cell"]: r["param_bytes"] / 4 for r in rows if r["mode"] == "seq"}
    return [{"mode": r["mode"], "nproc": r["nproc"], "cell": r["cell"],
             "params": params[r["cell"]], "batch": r["global_batch"],
             "step_seconds": r["epoch_seconds"] / r["updates_per_epoch"]}
            for r in rows if r["mode"] in ("seq", "ddp") and r["cell"] in params]


def fit(points: list[dict], cores: int) -> np.ndarray:
    """Non-negative least squares on the relative error: the best over every subset of the
    terms whose unconstrained solution is non-negative (4 terms: 15 subsets)."""
    x = np.array([features(p["params"], p["batch"], p["nproc"], cores, p["mode"] == "ddp")
                  for p in points])
    t = np.array([p["step_seconds"] for p in points])
    x, y = x / t[:, None], np.ones_like(t)  # rows scaled by 1/t: relative residuals
    best, best_error = np.zeros(x.shape[1]), float("inf")
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(range(x.shape[1]), k):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            error = float(np.sum((x[:, subset] @ coef - y) ** 2))
            if error < best_error:
                best_error, best = error, np.zeros(x.shape[1])
                best[list(subset)] = coef
    return best


def predict(coef: np.ndarray, params, batch: float, nproc: int, cores: int, ddp: bool):
    return np.array([np.dot(coef, features(p, batch, nproc, cores, ddp))
                     for p in np.atleast_1d(params)])


def crossover(coef: np.ndarray, batch: float) -> float | None:
    """Parameters from which ddp on 2 ranks takes less time per step than seq; None if never."""
    a, c, l, s = coef
    gain_per_param = c * batch / 2 - 4 * s
    return l / gain_per_param if gain_per_param > 0 else None


def draw(points: list[dict], coef: np.ndarray, cores: int, out: Path) -> Path:
    plt = _pyplot()
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    batch = points[0]["batch"]
    sizes = np.geomspace(min(p["params"] for p in points) / 2,
                         max(p["params"] for p in points) * 2, 200)
    seq = predict(coef, sizes, batch, 1, cores, False)
    runs = sorted({(p["mode"], p["nproc"]) for p in points})
    for i, (mode, n) in enumerate(runs):
        mine = sorted((p for p in points if (p["mode"], p["nproc"]) == (mode, n)),
                      key=lambda p: p["params"])
        fitted = n <= cores
        color = f"C{i}"
        model = predict(coef, sizes, batch, n, cores, mode == "ddp")
        ax_t.plot(sizes, 1e3 * model, color=color, ls="-" if fitted else ":")
        ax_t.plot([p["params"] for p in mine], [1e3 * p["step_seconds"] for p in mine], "o",
                  color=color, mfc=None if fitted else "none",
                  label=f"{mode} x{n}" + ("" if fitted else " (turn-taking: not fitted)"))
        if mode == "ddp":
            seq_at = {p["cell"]: p["step_seconds"] for p in points if p["mode"] == "seq"}
            ax_s.plot(sizes, seq / model, color=color, ls="-" if fitted else ":")
            ax_s.plot([p["params"] for p in mine], [seq_at[p["cell"]] / p["step_seconds"]
                                                    for p in mine], "o", color=color,
                      mfc=None if fitted else "none", label=f"ddp x{n}")
    ax_s.axhline(1, color="black", lw=0.8)
    where = crossover(coef, batch)
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
    a, c, l, s = coef
    fig.suptitle(f"t = {1e3 * a:.3g} ms + B·P/min(n,{cores}) × {1e12 * c:.3g} ps + "
                 f"{1e3 * l:.3g} ms (ddp) + 4P·2(n-1)/n bytes / {_rate(s)}")
    return _save(fig, plt, out)


def _rate(s: float) -> str:
    return "∞ GB/s" if s == 0 else f"{1e-9 / s:.3g} GB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--cores", type=int, help="the node's cores (default: the sweep's)")
    args = parser.parse_args()
    meta = read_sweep(args.sweep_dir)
    cores = args.cores or meta.get("cores") or 1
    points = measurements(meta)
    fitted = [p for p in points if p["nproc"] <= cores]
    coef = fit(fitted, cores)
    where = crossover(coef, points[0]["batch"])
    for p in points:
        p["model_seconds"] = float(predict(coef, p["params"], p["batch"], p["nproc"], cores,
                                           p["mode"] == "ddp")[0])
    report = {"cores": cores, "coefficients": dict(zip(TERMS, map(float, coef))),
              "effective_gflops": 6e-9 / coef[1] if coef[1] else None,
              "all_reduce_gb_per_s": 1e-9 / coef[3] if coef[3] else None,
              "two_ranks_pay_from_params": where, "points": points}
    (args.sweep_dir / "cost_model.json").write_text(json.dumps(report, indent=2) + "\n")
    path = draw(points, coef, cores, args.sweep_dir / "cost_model.png")
    print(f"cost model ({cores} cores): " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                      report["coefficients"].items()))
    print("  measured vs model, ms per update:")
    for p in points:
        print(f"  {p['mode']:>4} x{p['nproc']:<2} P={p['params']:>10.0f}  "
              f"{1e3 * p['step_seconds']:9.3f}  {1e3 * p['model_seconds']:9.3f}")
    print("two ranks pay from " + (f"{where:.0f} parameters" if where else "no width (model)"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
