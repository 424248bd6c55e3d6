"""Figures of runs and sweeps (`dptrain plot`, `dptrain report`), PNG through matplotlib's Agg.

matplotlib is imported inside the functions that draw, never by the CLI at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

from dptrain.errors import UserError
from dptrain.runlog import METRICS, SUMMARY
from dptrain.sweep import read_sweep

FIGURES = ("loss.png", "val_accuracy.png", "accuracy_vs_nproc.png", "time_vs_nproc.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, also on a head-less server
    import matplotlib.pyplot as plt

    return plt


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(summary, per-epoch metrics) of a finished run; anything missing is a UserError."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists() or not (run_dir / METRICS).exists():
        raise UserError(f"{run_dir}: not a finished run folder (no {SUMMARY} or {METRICS})")
    summary = json.loads((run_dir / SUMMARY).read_text())
    lines = (run_dir / METRICS).read_text().splitlines()
    return summary, [json.loads(line) for line in lines if line.strip()]


def run_label(summary: dict) -> str:
    """e.g. 'ddp x8, B=42000, lr=0.0513, warmup' — what tells two runs apart."""
    label = (f"{summary['mode']} x{summary['world_size']}, B={summary['global_batch']}, "
             f"lr={summary['lr']:.3g}")
    return label + (", warmup" if summary.get("warmup_steps") else "")


def _curves(ax_loss, ax_acc, runs: list[tuple[str, dict, list[dict]]]) -> None:
    """Train loss solid, val loss dashed in one colour per run; val accuracy beside."""
    for i, (label, summary, metrics) in enumerate(runs):
        epochs = [m["epoch"] for m in metrics]
        # Markers only where there are few points: a one-epoch line would be invisible.
        style = {"color": f"C{i % 10}", "marker": "o" if len(epochs) <= 12 else None, "ms": 3}
        if summary["mode"] == "seq":  # wide and pale, so that a parallel run on top shows
            style.update(lw=4, alpha=0.4)
        if ax_loss is not None:
            ax_loss.plot(epochs, [m["train_loss"] for m in metrics], ls="-",
                         label=f"{label} (train)", **style)
            ax_loss.plot(epochs, [m["val_loss"] for m in metrics], ls="--",
                         label=f"{label} (val)", **style)
        if ax_acc is not None:
            ax_acc.plot(epochs, [m["val_accuracy"] for m in metrics], label=label, **style)
    if ax_loss is not None:
        ax_loss.set_yscale("log")  # a diverging run would otherwise flatten all the others
    for ax, ylabel, title in ((ax_loss, "mean loss per sample (log scale)", "Train (solid) and val (dashed) loss"),
                              (ax_acc, "validation accuracy", "Validation accuracy")):
        if ax is not None:
            ax.set(xlabel="epoch", ylabel=ylabel, title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Loss curves and val accuracy of several runs side by side, in one PNG."""
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):  # e.g. two sweeps' ddp-8: name their sweeps too
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]
    runs = [(f"{name}: {run_label(s)}", s, m)
            for name, d in zip(names, run_dirs) for s, m in [read_run(d)]]
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    _curves(ax_loss, ax_acc, runs)
    return _save(fig, plt, out)


def report(sweep_dir: Path) -> list[Path]:
    """The four figures of a sweep, written into its folder; returns their paths."""
    sweep_dir = Path(sweep_dir)
    meta = read_sweep(sweep_dir)
    ok = [r for r in meta["runs"] if r["status"] == "ok"]
    if not ok:
        raise UserError(f"{sweep_dir}: every run of this sweep failed; nothing to plot")
    runs = [(f"{r['mode']} x{r['nproc']}, lr={r['lr']:.3g}", *read_run(sweep_dir / r["run_dir"]))
            for r in ok]
    plt = _pyplot()
    paths = []
    for name, with_loss in (("loss.png", True), ("val_accuracy.png", False)):
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
        _curves(ax if with_loss else None, None if with_loss else ax, runs)
        fig.suptitle(_setting(ok[0]))
        paths.append(_save(fig, plt, sweep_dir / name))
    paths.append(_accuracy_vs_nproc(plt, ok, meta["mode"], sweep_dir / "accuracy_vs_nproc.png"))
    paths.append(_time_vs_nproc(plt, ok, meta["mode"], sweep_dir / "time_vs_nproc.png"))
    return paths


def _setting(row: dict) -> str:
    return f"{row['epochs']} epochs, global batch {row['global_batch']}"


def _split(rows: list[dict], mode: str) -> tuple[list[dict], dict | None]:
    parallel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["nproc"])
    return parallel, next((r for r in rows if r["mode"] == "seq"), None)


def _accuracy_vs_nproc(plt, rows: list[dict], mode: str, out: Path) -> Path:
    parallel, seq = _split(rows, mode)
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    ax.plot([r["nproc"] for r in parallel], [r["test_accuracy"] for r in parallel], "o-",
            label=f"{mode} test accuracy")
    if seq is not None:
        ax.axhline(seq["test_accuracy"], color="gray", ls="--", label="seq test accuracy")
    ax.set(xlabel="processes (nproc)", ylabel="final test accuracy",
           title=f"Final test accuracy vs processes ({_setting(rows[0])})")
    ax.set_xticks([r["nproc"] for r in parallel])
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, out)


def _time_vs_nproc(plt, rows: list[dict], mode: str, out: Path) -> Path:
    """Left: train and wall seconds; right: speedup and efficiency against seq (if present)."""
    parallel, seq = _split(rows, mode)
    nprocs = [r["nproc"] for r in parallel]
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for key, color, name in (("train_seconds", "C0", "train"), ("wall_seconds", "C1", "wall")):
        ax_time.plot(nprocs, [r[key] for r in parallel], "o-", color=color, label=f"{mode} {name}")
        if seq is not None:
            ax_time.axhline(seq[key], color=color, ls="--", label=f"seq {name}")
    ax_time.set(xlabel="processes (nproc)", ylabel="seconds", title="Run time vs processes")
    if seq is not None:
        for key, style, name in (("speedup", "o-", "speedup (train)"),
                                 ("wall_speedup", "s-", "speedup (wall)"),
                                 ("efficiency", "o:", "efficiency (train)")):
            ax_speed.plot(nprocs, [r[key] for r in parallel], style, label=name)
        ax_speed.plot(nprocs, nprocs, color="gray", ls="--", lw=0.8, label="ideal speedup")
        ax_speed.set_ylim(bottom=0)
    else:
        ax_speed.text(0.5, 0.5, "no seq run in this sweep:\nno speedup", ha="center",
                      va="center", transform=ax_speed.transAxes)
    ax_speed.set(xlabel="processes (nproc)", ylabel="ratio to seq",
                 title="Speedup (seq seconds / run seconds) and efficiency (speedup / nproc)")
    for ax in (ax_time, ax_speed):
        ax.set_xticks(nprocs)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the speedup panel is empty without seq
            ax.legend(fontsize="small")
    fig.suptitle(_setting(rows[0]))
    return _save(fig, plt, out)


def _save(fig, plt, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
