"""Fit the cost model (dptrain/study/costmodel.py) to a width x nproc sweep and draw it.

    python benchmarks/cost_model.py SWEEP_DIR      (a `dptrain sweep --vary hidden=...` folder)

Fitted to the seq and ddp runs with n <= C (ranks that take turns on cores are drawn, not
fitted: the model has no term for it). Per-step seconds are each run's `epoch_seconds` (a
median epoch of training steps) / updates per epoch. Two processes pay when t(P, 1) > t(P, 2),
i.e. from P* = l / (c * B / 2 - 4 * s): printed, with the widths around it. Writes
cost_model.png and cost_model.json into SWEEP_DIR.
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
