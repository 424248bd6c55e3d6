"""Figures of runs and sweeps (`dptrain plot`, `dptrain report`), PNG through matplotlib's Agg.

matplotlib is imported inside the functions that draw, never by the CLI at start-up.
"""

from __future__ import annotations

from pathlib import Path

from dptrain.errors import UserError
from dptrain.storage.runlog import (METRICS, SUMMARY, read_records, read_summary,
                                    write_atomic)
from dptrain.study.sweep import check_relative, read_sweep

FIGURES = ("loss.png", "val_accuracy.png", "accuracy_vs_nproc.png", "time_vs_nproc.png",
           "time_breakdown.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, also on a head-less server
    import matplotlib.pyplot as plt

    return plt


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(summary, per-epoch metrics) of a run. A run still training (or stopped) has no summary
    yet: its config.toml's [resolved] table stands in, with "unfinished": True."""
    from dptrain.config import RESOLVED_SECTION, read_toml
    from dptrain.storage.runlog import CONFIG

    run_dir = Path(run_dir)
    if not (run_dir / METRICS).exists():
        why = "is not a run folder" if not (run_dir / CONFIG).exists() else "has no epochs yet"
        raise UserError(f"{run_dir} {why} (no {METRICS})")
    # A run writes its metrics line by line: a line being written is not yet a record.
    metrics = [record for record in read_records(run_dir / METRICS) if _plottable(record)]
    if (run_dir / SUMMARY).exists():
        return read_summary(run_dir), metrics
    resolved = read_toml(run_dir / CONFIG).get(RESOLVED_SECTION) if (run_dir / CONFIG).exists() \
        else None
    if not isinstance(resolved, dict) or not metrics:
        what = f"no {CONFIG} with its [resolved] table" if not isinstance(resolved, dict) \
            else "no finished epoch"
        raise UserError(f"{run_dir}: nothing to draw yet ({what}, no {SUMMARY})")
    return {**resolved, "unfinished": True}, metrics


def _plottable(record: dict) -> bool:
    """A record with the numbers every curve draws (an edited or damaged line is left out)."""
    return all(isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
               for key in ("epoch", "train_loss", "val_loss", "val_accuracy"))


def run_label(summary: dict) -> str:
    """e.g. 'ddp x8, B=42000, lr=0.0513, warmup' — what tells two runs apart."""
    label = (f"{summary['mode']} x{summary['world_size']}, B={summary['global_batch']}, "
             f"lr={summary['lr']:.3g}")
    schedule = summary.get("lr_schedule", "")  # e.g. "warmup ..., then cosine 0.01 -> 0 ..."
    label += "".join(f", {kind}" for kind in ("cosine", "linear", "step")
                     if f"{kind} " in schedule)
    label += ", warmup" if summary.get("warmup_steps") else ""
    return label + (", unfinished" if summary.get("unfinished") else "")


def _curves(ax_loss, ax_acc, runs: list[tuple[str, dict, list[dict]]]) -> None:
    """Train loss solid, val loss dashed in one colour per run; val accuracy beside."""
    from matplotlib.ticker import MaxNLocator

    for i, (label, summary, metrics) in enumerate(runs):
        epochs = [m["epoch"] for m in metrics]
        # Markers only where there are few points: a one-epoch line would be invisible.
        style = {"color": f"C{i % 10}", "marker": "o" if len(epochs) <= 12 else None, "ms": 3}
        if summary["mode"] == "seq":  # wide and pale, so that a parallel run on top shows
            style.update(lw=4, alpha=0.4, ms=10)
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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 0.96
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")


def plot_runs(run_dirs: list[Path], out: Path, *, breakdown: bool = False) -> Path:
    """Loss curves and val accuracy of several runs side by side, in one PNG; `breakdown`:
    where each run's time goes instead (time_breakdown)."""
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):  # e.g. two sweeps' ddp-8: name their sweeps too
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in run_dirs]
    runs = [(f"{name}: {run_label(s)}", s, m)
            for name, d in zip(names, run_dirs) for s, m in [read_run(d)]]
    plt = _pyplot()
    if breakdown:
        bars = [(name, metrics) for name, (_, _, metrics) in zip(names, runs)]
        if not any(epoch_breakdown(m) for _, m in bars):
            raise UserError("none of these runs timed its phases (runs before dptrain had "
                            "phase times, or --no-phase-times)")
        fig, ax = plt.subplots(figsize=(5.5 + 1.1 * len(bars), 5.5), constrained_layout=True)
        _phase_bars(ax, bars)
        ax.set_title("Where the time goes: seconds per epoch (mean over ranks)")
        return _save(fig, plt, out)
    noisy = any(_has_noise(m) for _, _, m in runs)  # a third panel: the noise scale
    fig, axes = plt.subplots(1, 3 if noisy else 2, figsize=(19 if noisy else 13, 5),
                             constrained_layout=True)
    _curves(axes[0], axes[1], runs)
    if noisy:
        _noise_curves(axes[2], runs)
    return _save(fig, plt, out)


def _has_noise(metrics: list[dict]) -> bool:
    return any("noise_scale" in m for m in metrics)


def _noise_curves(ax, runs: list[tuple[str, dict, list[dict]]]) -> None:
    """The gradient noise scale B_simple per epoch (components/noise.py), with the standard
    error of each epoch's estimate, in the colours of _curves; runs without it are skipped."""
    from matplotlib.ticker import MaxNLocator

    for i, (label, _, metrics) in enumerate(runs):
        points = [m for m in metrics if "noise_scale" in m]
        if points:
            ax.errorbar([m["epoch"] for m in points], [m["noise_scale"] for m in points],
                        yerr=[m.get("noise_scale_se", 0.0) for m in points], color=f"C{i % 10}",
                        marker="o" if len(points) <= 12 else None, ms=3, capsize=2, label=label)
    ax.set(xlabel="epoch", ylabel="B_simple = tr(Σ) / |G|² (samples)",
           title="Gradient noise scale (± standard error of the epoch's mean)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
# --- where the time goes ----------------------------------------------------------------------

# (key, label, colour) in stacking order: the training steps' phases, what else the epoch took,
# then validation and checkpoint writing, which follow the epoch.
SEGMENTS = (("batch", "batch (index + gather)", "#8c8c8c"),
            ("forward_backward", "forward + backward", "#1f77b4"),
            ("gather", "parameter all-gather (fsdp)", "#17becf"),
            ("sum", "gradient sum", "#2ca02c"),
            ("wait", "waiting for the slowest peer", "#d62728"),
            ("optimizer", "optimizer (lr, NaN check, step)", "#ff7f0e"),
            ("epoch_end", "the epoch's end (its loss sum)", "#bcbd22"),
            ("other", "rest of the epoch (the loop's own lines)", "#e0e0e0"),
            ("evaluation", "validation", "#9467bd"),
            ("checkpoint", "checkpoint writing", "#8c564b"))


def epoch_breakdown(metrics: list[dict]) -> dict[str, float]:
    """Seconds per epoch by segment (SEGMENTS), the mean over ranks and over the epochs after
    the first (which also pays first touches); {} when the run timed no phases."""
    timed = [m for m in metrics if "phase_seconds" in m]
    timed = timed[1:] or timed
    if not timed:
        return {}
    segments: dict[str, float] = {}
    for m in timed:
        phases = m["phase_seconds"]["mean"]
        for key, seconds in {**phases, "other": max(m["epoch_seconds"] - sum(phases.values()), 0),
                             "evaluation": m["val_seconds"],
                             "checkpoint": m["checkpoint_seconds"]}.items():
            segments[key] = segments.get(key, 0.0) + seconds / len(timed)
    return segments


def _phase_bars(ax, bars: list[tuple[str, list[dict]]], legend: bool = True) -> None:
    """A stacked bar per (label, metrics); a legend of the segments that occur, at the right."""
    breakdowns = [epoch_breakdown(metrics) for _, metrics in bars]
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    for key, label, colour in SEGMENTS:
        heights = [b.get(key, 0.0) for b in breakdowns]
        if any(heights):
            ax.bar(x, heights, bottom=bottom, color=colour, label=label, width=0.7,
                   edgecolor="white", linewidth=0.5)
            bottom = [b + h for b, h in zip(bottom, heights)]
    for i, b in enumerate(breakdowns):
        if not b:
            ax.text(i, 0, "no phase\ntimes", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(list(x), [label for label, _ in bars], rotation=30 if len(bars) > 6 else 0)
    ax.set_ylabel("seconds per epoch")
    ax.grid(alpha=0.3, axis="y")
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], fontsize="small",  # the stack's order, top first
                  loc="upper left", bbox_to_anchor=(1.01, 1))


def _breakdown_table(path: Path, panels: list[tuple[str, list]]) -> None:
    """The figure's numbers: seconds per epoch by segment, a line per run."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["cell", "run", *(key for key, _, _ in SEGMENTS)])
    for cell, bars in panels:
        for run, metrics in bars:
            breakdown = epoch_breakdown(metrics)
            writer.writerow([cell, run, *(f"{breakdown[key]:.6f}" if key in breakdown else ""
                                          for key, _, _ in SEGMENTS)])
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))


def _time_breakdown(plt, sweep_dir: Path, rows: list[dict], keys: list[str]) -> Path | None:
    """time_breakdown.png (and its numbers, time_breakdown.csv): a stacked bar per run (seq,
    then each mode by nproc), one panel per cell of a --vary grid; None when no run timed its
    phases."""
    cells = _cells(rows, keys) if keys else [("", rows)]
    panels = []
    for label, runs in cells:
        ordered = sorted(runs, key=lambda r: (r["mode"] != "seq", r["mode"], r["nproc"]))
        bars = [("seq" if r["mode"] == "seq" else f"{r['mode']} x{r['nproc']}",
                 read_run(sweep_dir / check_relative(r["run_dir"], "run_dir"))[1])
                for r in ordered]
        panels.append((label, bars))
    if not any(epoch_breakdown(m) for _, bars in panels for _, m in bars):
        return None
    _breakdown_table(sweep_dir / "time_breakdown.csv", panels)
    columns = min(len(panels), 2)
    lines = -(-len(panels) // columns)
    width = max(len(bars) for _, bars in panels)
    fig, axes = plt.subplots(lines, columns, squeeze=False, constrained_layout=True,
                             figsize=(3 + columns * (1.5 + 0.9 * width), 4.5 * lines))
    for i, (ax, (label, bars)) in enumerate(zip(axes.flat, panels)):
        _phase_bars(ax, bars, legend=i == columns - 1)  # beside the first line's last panel
        if label:
            ax.set_title(label)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Where the time goes: seconds per epoch, mean over ranks and epochs "
                 f"({setting(rows[0], keys)})")
    return _save(fig, plt, sweep_dir / "time_breakdown.png")


def report(sweep_dir: Path) -> list[Path]:
    """The figures of a sweep, written into its folder; returns their paths.

    A sweep over nproc alone gets curves and time/accuracy against nproc; a --vary grid gets
    the figures of what it varies (speedup, memory, accuracy against the global batch).
    """
    sweep_dir = Path(sweep_dir)
    meta = read_sweep(sweep_dir)
    ok = [r for r in meta["runs"] if r["status"] == "ok"]
    if not ok:
        raise UserError(f"{sweep_dir}: every run of this sweep failed; nothing to plot")
    modes = meta.get("modes") or [meta["mode"]]  # sweeps before --vary had one mode
    plt = _pyplot()
    keys = [v["key"] for v in meta.get("vary") or []]
    breakdown = _time_breakdown(plt, sweep_dir, ok, keys)
    extra = [breakdown] if breakdown else []
    if keys:
        return grid_figures(plt, ok, modes, keys, sweep_dir, also=extra)
    runs = [(f"{r['mode']} x{r['nproc']}, lr={r['lr']:.3g}",
             *read_run(sweep_dir / check_relative(r["run_dir"], "run_dir"))) for r in ok]
    paths = []
    for name, with_loss in (("loss.png", True), ("val_accuracy.png", False)):
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
        _curves(ax if with_loss else None, None if with_loss else ax, runs)
        fig.suptitle(setting(ok[0]))
        paths.append(_save(fig, plt, sweep_dir / name))
    paths.append(_accuracy_vs_nproc(plt, ok, modes, sweep_dir / "accuracy_vs_nproc.png"))
    paths.append(_time_vs_nproc(plt, ok, modes, sweep_dir / "time_vs_nproc.png"))
    if any(_has_noise(m) for _, _, m in runs):
        paths.append(_noise_figure(plt, runs, setting(ok[0]), sweep_dir / "noise_scale.png"))
    return paths + extra


def _noise_figure(plt, runs, title: str, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    _noise_curves(ax, runs)
    fig.suptitle(title)
    return _save(fig, plt, out)


def setting(row: dict, keys: list[str] = ()) -> str:
    """What every run of the figure shares: the epochs and the global batch, unless varied."""
    parts = [] if "epochs" in keys else [epochs_text(row["epochs"])]
    if not {"batch_size", "full_batch"} & set(keys):
        parts.append(f"global batch {row['global_batch']}")
    return ", ".join(parts)


def epochs_text(epochs: int) -> str:
    return f"{epochs} epoch{'s' if epochs != 1 else ''}"


def _split(rows: list[dict], modes: list[str]) -> tuple[dict[str, list[dict]], dict | None]:
    """The parallel runs of each mode by nproc, and the seq run (if any)."""
    parallel = {m: sorted((r for r in rows if r["mode"] == m), key=lambda r: r["nproc"])
                for m in modes if m != "seq"}
    return parallel, next((r for r in rows if r["mode"] == "seq"), None)


def _nprocs(parallel: dict[str, list[dict]]) -> list[int]:
    return sorted({r["nproc"] for runs in parallel.values() for r in runs})


def _accuracy_vs_nproc(plt, rows: list[dict], modes: list[str], out: Path) -> Path:
    parallel, seq = _split(rows, modes)
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for mode, runs in parallel.items():
        ax.plot([r["nproc"] for r in runs], [r["test_accuracy"] for r in runs], "o-",
                label=f"{mode} test accuracy")
    if seq is not None:
        ax.axhline(seq["test_accuracy"], color="gray", ls="--", label="seq test accuracy")
    ax.set(xlabel="processes (nproc)", ylabel="final test accuracy",
           title=f"Final test accuracy vs processes ({setting(rows[0])})")
    ax.set_xticks(_nprocs(parallel) or [1])
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, out)


def _time_vs_nproc(plt, rows: list[dict], modes: list[str], out: Path) -> Path:
    """Left: train and wall seconds; right: speedup and efficiency against seq (if present)."""
    parallel, seq = _split(rows, modes)
    nprocs = _nprocs(parallel)
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for (mode, runs), ls in zip(parallel.items(), ("-", "--")):
        for key, color, name in (("train_seconds", "C0", "train"), ("wall_seconds", "C1", "wall")):
            ax_time.plot([r["nproc"] for r in runs], [r[key] for r in runs], "o", ls=ls,
                         color=color, label=f"{mode} {name}")
    if seq is not None:
        for key, color, name in (("train_seconds", "C0", "train"), ("wall_seconds", "C1", "wall")):
            ax_time.axhline(seq[key], color=color, ls=":", label=f"seq {name}")
    ax_time.set(xlabel="processes (nproc)", ylabel="seconds", title="Run time vs processes")
    if seq is not None and nprocs:
        for (mode, runs), ls in zip(parallel.items(), ("-", "--")):
            x = [r["nproc"] for r in runs]
            for key, marker, name in (("speedup", "o", "speedup (train)"),
                                      ("wall_speedup", "s", "speedup (wall)"),
                                      ("efficiency", "^", "efficiency (train)")):
                ax_speed.plot(x, [r[key] for r in runs], marker=marker, ls=ls,
                              label=f"{mode} {name}")
        ideal_line(ax_speed, max(nprocs), [r[key] for runs in parallel.values() for r in runs
                                           for key in ("speedup", "wall_speedup")])
        ax_speed.axhline(1, color="black", lw=0.8, label="as fast as seq")
    else:
        ax_speed.text(0.5, 0.5, "no seq run in this sweep:\nno speedup", ha="center",
                      va="center", transform=ax_speed.transAxes)
    ax_speed.set(xlabel="processes (nproc)", ylabel="ratio to seq",
                 title="Speedup (seq seconds / run seconds) and efficiency (speedup / nproc)")
    for ax in (ax_time, ax_speed):
        ax.set_xticks(sorted({1, *nprocs}))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the speedup panel is empty without seq
            ax.legend(fontsize="small")
    fig.suptitle(setting(rows[0]))
    return _save(fig, plt, out)


def ideal_line(ax, largest: int, measured: list[float]) -> None:
    """Speedup = nproc, from 1 process (a visible segment even when only one nproc was run).
    The measured values set the scale, from 0: the line runs off the top rather than squash
    speedups of 0.1 to 2 against an ideal of 8."""
    ax.plot([1, max(largest, 2)], [1, max(largest, 2)], color="gray", ls="--", lw=1,
            label="ideal speedup (= nproc)")
    ax.set_ylim(0, max([2.0, *(1.15 * v for v in measured if v is not None)]))


# --- the figures of a --vary grid ---------------------------------------------------------

MODE_STYLES = {"seq": dict(ls="", marker="*", ms=11), "ddp": dict(ls="-", marker="o"),
               "fsdp": dict(ls="--", marker="s")}


def grid_figures(plt, rows: list[dict], modes: list[str], keys: list[str],
                 sweep_dir: Path, also: list[Path] = ()) -> list[Path]:
    """What a grid shows, each figure where the grid has its data: speedup against nproc (one
    line per cell) and as a cell x nproc heatmap; memory and time per epoch against nproc; test
    accuracy against the global batch (one line per value of the other varied keys)."""
    parallel = [r for r in rows if r["mode"] != "seq"]
    paths = []
    if any(r.get("speedup") for r in parallel):
        paths.append(_speedup_vs_nproc(plt, rows, keys, sweep_dir / "speedup_vs_nproc.png"))
        paths.append(_speedup_heatmap(plt, rows, modes, keys, sweep_dir / "speedup_heatmap.png"))
    if parallel and any(r.get("peak_rss_bytes") for r in rows):
        paths.append(_memory_vs_nproc(plt, rows, keys, sweep_dir / "memory_vs_nproc.png"))
    if {"batch_size", "full_batch"} & set(keys):
        paths.append(_accuracy_vs_batch(plt, rows, keys, sweep_dir))
    paths += also  # drawn already (time_breakdown)
    if any(r.get("noise_scale") for r in rows):  # every run with the estimate, over epochs
        runs = [(f"{r['mode']} x{r['nproc']}, {_values_label(r, keys)}",
                 *read_run(sweep_dir / r["run_dir"])) for r in rows if r.get("noise_scale")]
        paths.append(_noise_figure(plt, runs, "the runs' noise scale",
                                   sweep_dir / "noise_scale.png"))
    if not paths:
        raise UserError(f"{sweep_dir}: this grid has no speedups (no seq run), no memory, no "
                        "phase times and no varied batch to draw")
    return paths


def _cells(rows: list[dict], keys: list[str]) -> list[tuple[str, list[dict]]]:
    """(label, rows) per cell, in the sweep's order; the label is the varied values."""
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(_values_label(r, keys), []).append(r)
    return list(cells.items())


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _values_label(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={_text(row['vary'][k])}" for k in keys)


def _by_mode(runs: list[dict]) -> dict[str, list[dict]]:
    modes: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["nproc"]):
        modes.setdefault(r["mode"], []).append(r)
    return modes


def _speedup_vs_nproc(plt, rows: list[dict], keys: list[str], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    nprocs = sorted({r["nproc"] for r in rows if r["mode"] != "seq"})
    for i, (label, runs) in enumerate(_cells(rows, keys)):
        for mode, line in _by_mode(runs).items():
            if mode != "seq":
                ax.plot([r["nproc"] for r in line], [r["speedup"] for r in line],
                        color=f"C{i % 10}", label=f"{label} ({mode})", **MODE_STYLES[mode])
    ideal_line(ax, max(nprocs), [r.get("speedup") for r in rows if r["mode"] != "seq"])
    ax.axhline(1, color="black", lw=0.8, label="as fast as seq")
    ax.set(xlabel="processes (nproc)", ylabel="train speedup (seq train s / run train s)",
           title=f"Train speedup against nproc, seq of the same cell = 1 "
                 f"({setting(rows[0], keys)})")
    ax.set_xticks(sorted({1, *nprocs}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title=", ".join(keys))
    return _save(fig, plt, out)


def _speedup_heatmap(plt, rows: list[dict], modes: list[str], keys: list[str],
                     out: Path) -> Path:
    """One panel per parallel mode: a row per cell, a column per nproc, the train speedup."""
    from matplotlib.colors import TwoSlopeNorm

    cells = _cells(rows, keys)
    nprocs = sorted({r["nproc"] for r in rows if r["mode"] != "seq"})
    parallel_modes = [m for m in modes if m != "seq"]
    values = {(label, r["mode"], r["nproc"]): r.get("speedup") for label, runs in cells
              for r in runs}
    top = max([v for v in values.values() if v] + [2.0])
    norm = TwoSlopeNorm(vmin=0, vcenter=1, vmax=top)  # red: slower than seq; blue: faster
    # Rows are labelled by their values alone (the keys name the axis), and the figure is
    # sized from the longest label and a fixed width per cell, so that neither the labels nor
    # the numbers run into each other, however many cells and keys.
    rows_text = [", ".join(_text(r["vary"][k]) for k in keys) for _, (r, *_) in cells]
    label_inches = 0.6 + 0.08 * max(len(t) for t in rows_text)
    fig, axes = plt.subplots(1, len(parallel_modes), squeeze=False, constrained_layout=True,
                             figsize=(1.2 + len(parallel_modes) * (label_inches + 0.9 * len(nprocs)),
                                      1.8 + 0.45 * len(cells)))
    for ax, mode in zip(axes[0], parallel_modes):
        grid = [[values.get((label, mode, n)) for n in nprocs] for label, _ in cells]
        image = ax.imshow([[float("nan") if v is None else v for v in line] for line in grid],
                          cmap="RdBu", norm=norm, aspect="auto")
        for y, line in enumerate(grid):
            for x, v in enumerate(line):
                dark = v is not None and not 0.2 < norm(v) < 0.8  # white on the deep colours
                ax.text(x, y, "-" if v is None else f"{v:.2f}", ha="center", va="center",
                        fontsize="small", color="white" if dark else "black")
        ax.set_xticks(range(len(nprocs)), [str(n) for n in nprocs])
        ax.set_yticks(range(len(cells)), rows_text)
        ax.set(xlabel="processes (nproc)", ylabel=", ".join(keys), title=f"{mode}: train speedup")
    fig.colorbar(image, ax=axes[0].tolist(), label="speedup (1 = seq)")
    fig.suptitle(setting(rows[0], keys))
    return _save(fig, plt, out)


def _memory_vs_nproc(plt, rows: list[dict], keys: list[str], out: Path) -> Path:
    """Per rank: parameter + gradient + optimizer bytes, peak RSS, and seconds per epoch."""
    panels = (("model state per rank, MB (params + grads + optimizer)",
               lambda r: (r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]) / 1e6),
              ("peak RSS per rank, MB (the largest rank)", lambda r: r["peak_rss_bytes"] / 1e6),
              ("seconds per epoch (training steps)", lambda r: r.get("epoch_seconds")))
    from matplotlib.ticker import LogFormatter

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), layout="constrained")
    nprocs = sorted({r["nproc"] for r in rows})
    for ax, (ylabel, value) in zip(axes, panels):
        for i, (label, runs) in enumerate(_cells(rows, keys)):
            for mode, line in _by_mode(runs).items():
                if all(r.get("param_bytes") is not None for r in line):
                    ax.plot([r["nproc"] for r in line], [value(r) for r in line],
                            color=f"C{i % 10}", label=f"{label} ({mode})", **MODE_STYLES[mode])
        ax.set(xlabel="processes (nproc)", ylabel=ylabel, yscale="log")
        # Plain numbers (0.5, 20, 300), minor ticks labelled too where a panel spans little.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 1)))
        ax.set_xticks(nprocs)
        ax.grid(alpha=0.3, which="both")
    # Beside the panels, not over a panel's lines (a grid has a line per cell and mode).
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper",
               fontsize="small", title=", ".join(keys))
    fig.suptitle("Memory and time per rank against nproc (star: seq, solid: ddp, dashed: "
                 f"fsdp; {setting(rows[0], keys)})")
    return _save(fig, plt, out)


def _accuracy_vs_batch(plt, rows: list[dict], keys: list[str], sweep_dir: Path) -> Path:
    """Test accuracy against the global batch, one line per value of the other varied keys.
    The seq runs make the lines, parallel runs are open markers on them. Where the lines have
    a seq run at the lr rule's reference batch, a band marks 1 point below it (one band per
    model: lines that train the same model there share it), and a second panel zooms in."""
    others = [k for k in keys if k not in ("batch_size", "full_batch")]
    cells = _cells(rows, others) if others else [("", rows)]
    ref = _reference_batch(sweep_dir)
    bands = _bands(cells, ref)
    fig, axes = plt.subplots(1, 2 if bands else 1, squeeze=False, figsize=(15 if bands else 8.5, 5.5),
                             constrained_layout=True)
    axes = axes[0]
    batches = sorted({r["global_batch"] for r in rows})
    for ax in axes:
        _accuracy_lines(ax, cells)
        for accuracy, color, label in bands:
            ax.axhspan(accuracy - 0.01, accuracy, color=color, alpha=0.15, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(xlabel="global batch (samples per update)", ylabel="final test accuracy")
        ax.grid(alpha=0.3)
    if bands:
        top = max(r["test_accuracy"] for r in rows)
        axes[1].set_ylim(min(a for a, _, _ in bands) - 0.04, top + 0.005)
        axes[0].set_title("all runs")
        axes[1].set_title(f"near the accuracy at the reference batch {ref} (band: within 1 point)")
    axes[0].legend(fontsize="small", title=", ".join(others) or None)
    fig.suptitle(f"Test accuracy against the global batch after {epochs_text(rows[0]['epochs'])}")
    return _save(fig, plt, sweep_dir / "accuracy_vs_batch.png")


def _accuracy_lines(ax, cells: list[tuple[str, list[dict]]]) -> None:
    drawn = set()
    for i, (label, runs) in enumerate(cells):
        seq = sorted((r for r in runs if r["mode"] == "seq"), key=lambda r: r["global_batch"])
        points = tuple((r["global_batch"], r["test_accuracy"]) for r in seq)
        # Shrinking markers: one drawn exactly over an earlier one leaves it visible. A line
        # equal to an earlier one (lr_scaling=seed trains seq as linear does; a warmup from
        # the lr to itself changes nothing) is dashed, so that both show.
        shrink = i / max(len(cells) - 1, 1)
        ax.plot([b for b, _ in points], [a for _, a in points], marker="osD^vPX"[i % 7],
                ms=11 - 6 * shrink, lw=2.5 if points in drawn else 2, color=f"C{i % 10}",
                ls=(0, (3, 3)) if points in drawn else "-",
                label=(label or "seq") + (" (= a line above)" if points in drawn else ""))
        drawn.add(points)
        for r in (r for r in runs if r["mode"] != "seq"):
            ax.plot(r["global_batch"], r["test_accuracy"], ls="", marker="osD^v"[r["nproc"] % 5],
                    mfc="none", ms=13, color=f"C{i % 10}")
    parallel = {(r["mode"], r["nproc"]) for _, runs in cells for r in runs if r["mode"] != "seq"}
    for mode, n in sorted(parallel):
        ax.plot([], [], ls="", marker="osD^v"[n % 5], mfc="none", ms=13, color="gray",
                label=f"{mode} x{n} (open markers)")


def _reference_batch(sweep_dir: Path) -> int | None:
    """The lr rule's reference batch (the sweep's ref_batch_size)."""
    from dptrain.config import build_config, read_toml
    from dptrain.study.sweep import SWEEP_CONFIG

    try:
        return build_config(read_toml(sweep_dir / SWEEP_CONFIG)).optim.ref_batch_size
    except UserError:
        return None


def _bands(cells: list[tuple[str, list[dict]]], ref: int | None) -> list[tuple[float, str, str]]:
    """(accuracy, colour, label) of each distinct seq accuracy at the reference batch: one gray
    band where every line has the same model there, else one per line, in its colour (an
    average of two models' accuracies would describe neither)."""
    at_ref = [(i, r["test_accuracy"]) for i, (_, runs) in enumerate(cells) for r in runs
              if r["mode"] == "seq" and r["global_batch"] == ref]
    if not at_ref:
        return []
    if len({a for _, a in at_ref}) == 1:
        return [(at_ref[0][1], "gray", f"within 1 point of batch {ref} ({at_ref[0][1]:.4f})")]
    return [(a, f"C{i % 10}", f"within 1 point of its batch {ref} ({a:.4f})") for i, a in at_ref]


def _save(fig, plt, out: Path) -> Path:
    """Write the figure (its format from the suffix, PNG without one) as a new file renamed into
    place: a link at `out` is replaced, never written through."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(out, lambda f: fig.savefig(f, format=out.suffix[1:].lower() or "png",
                                                dpi=110))
    finally:
        plt.close(fig)
    return out


def matrix_figure(rows: list[dict], out: Path) -> Path:
    """The equivalence matrix (study/matrix.py): accuracy gap against time saved, one point per
    knob and nproc, a panel per model width, the seed band of seq shaded."""
    plt = _pyplot()
    widths = list(dict.fromkeys(r["width"] for r in rows))
    fig, axes = plt.subplots(1, len(widths), figsize=(9.5 * len(widths), 5.5), squeeze=False,
                             constrained_layout=True)
    markers = {"identical": "o", "round-off": "s", "differs": "X"}
    for ax, width in zip(axes[0], widths):
        mine = [r for r in rows if r["width"] == width]
        band = max(mine, key=lambda r: r["band_runs"])
        if band["band_runs"] > 1:  # as far as changing the seed moves seq's accuracy, either way
            spread = 100 * band["seed_spread"]
            ax.axhspan(-spread, spread, color="gray", alpha=0.2,
                       label=f"± the spread of seq over {band['band_runs']} seeds")
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0, color="black", lw=0.8)
        knobs = list(dict.fromkeys(r["knob"] for r in mine))
        for r in mine:
            x = 100 * r["time_saved"] if r["time_saved"] is not None else 0.0
            color = f"C{knobs.index(r['knob']) % 10}"
            ax.scatter(x, 100 * r["accuracy_diff"], marker=markers[r["verdict"]], s=60,
                       color=color, label=f"{r['knob']} ({r['verdict']})")
            ax.annotate(f"{r['mode']}×{r['nproc']}", (x, 100 * r["accuracy_diff"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize="small", loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
        untimed = " (no timings: time saved drawn as 0)" if any(
            r["time_saved"] is None for r in mine) else ""
        ax.set(xlabel="time saved per update against seq (%)",
               ylabel="test accuracy - seq fp32's (points)",
               title=f"hidden {width}{untimed}")
        ax.grid(alpha=0.3)
    fig.suptitle("What each knob buys: accuracy gap against time saved")
    return _save(fig, plt, out)
