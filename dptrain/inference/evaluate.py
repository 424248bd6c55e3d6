"""A trained run in use: `dptrain evaluate` (the test split) and `dptrain predict` (your images).

Both rebuild the plain MLP from the run's config.toml and load its model.pt in this process;
no process group is needed, whichever mode trained the run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dptrain.config import build_config, read_toml
from dptrain.errors import UserError
from dptrain.storage.runlog import CONFIG, MODEL, err

CLASSES = range(10)


def load_model(run_dir: Path):
    """(MLP with the run's final parameters, in eval mode; the run's Config)."""
    from dptrain.components.model import MLP
    from dptrain.storage.safeload import first_line, torch_load

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise UserError(f"{run_dir} {what}; give the folder of a finished run")
    for name in (CONFIG, MODEL):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir}: no {name} here; give the folder of a finished run")
    config = build_config(read_toml(run_dir / CONFIG), source=str(run_dir / CONFIG))
    model = MLP(config.model.hidden, config.model.activation)
    state = torch_load(run_dir / MODEL)  # weights_only; refused or corrupt: one line
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as e:  # another model's shape, or not a state
        raise UserError(f"{run_dir / MODEL}: cannot load it into the run's model "
                        f"({first_line(e)})") from None
    return model.eval(), config


def predict_proba(model, images: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Softmax probabilities (N x 10) of float images in [0, 1], shape N x 28 x 28 or N x 784."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1))
    with torch.no_grad():
        return torch.cat([torch.softmax(model(part), dim=1) for part in x.split(batch)]).numpy()


@dataclass(frozen=True)
class Evaluation:
    run_dir: Path
    confusion: np.ndarray  # [true, predicted] counts over the test split

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.confusion.sum())


def evaluate_run(run_dir: Path, data_dir: str | None = None) -> Evaluation:
    """The run's model on its test split (the split seed of its config)."""
    from dptrain.components.data import load_mnist, recorded_location, split_indices

    model, config = load_model(run_dir)
    if data_dir is None:  # where the run found the data, unless it has moved since
        data_dir, note = recorded_location(config.data.data_dir, typed=False)
        if note:
            print(f"dptrain: warning: {note}", file=sys.stderr)
    mnist = load_mnist(data_dir)
    test = split_indices(len(mnist.labels), config.data.split_seed).test
    images = mnist.images[test].astype(np.float32) / 255.0  # as training scaled them
    predicted = predict_proba(model, images).argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (mnist.labels[test].astype(np.int64), predicted), 1)
    return Evaluation(Path(run_dir), confusion)


def class_scores(confusion: np.ndarray) -> list[tuple[int, float, float, float, int]]:
    """(digit, precision, recall, F1, support) per class; 0 where a ratio has no denominator."""
    rows = []
    for k in CLASSES:
        hits, predicted, support = confusion[k, k], confusion[:, k].sum(), confusion[k].sum()
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((k, float(precision), float(recall), float(f1), int(support)))
    return rows


def print_evaluation(result: Evaluation, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    total = int(result.confusion.sum())
    console.print(f"[bold]test accuracy {result.accuracy:.4f}[/] "
                  f"({int(np.trace(result.confusion))} of {total} test images) — {result.run_dir}")
    scores = Table(title="per class")
    for header in ("digit", "precision", "recall", "F1", "support"):
        scores.add_column(header, justify="right")
    for digit, precision, recall, f1, support in class_scores(result.confusion):
        scores.add_row(str(digit), f"{precision:.4f}", f"{recall:.4f}", f"{f1:.4f}", str(support))
    console.print(scores)
    matrix = Table(title="confusion matrix (rows: true digit, columns: predicted)")
    matrix.add_column("true", justify="right", style="bold")
    for k in CLASSES:
        matrix.add_column(str(k), justify="right")
    for k in CLASSES:
        matrix.add_row(str(k), *(f"[green]{n}[/]" if j == k else (str(n) if n else "[dim]0[/]")
                                 for j, n in enumerate(result.confusion[k])))
    console.print(matrix)


def save_confusion_png(result: Evaluation, out: Path) -> Path:
    """The confusion matrix as a PNG heat map with its counts written in."""
    from dptrain.study.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    shown = ax.imshow(result.confusion, cmap="Blues")
    fig.colorbar(shown, ax=ax, label="test images")
    high = result.confusion.max() / 2
    for (true, predicted), n in np.ndenumerate(result.confusion):
        ax.text(predicted, true, str(n), ha="center", va="center", fontsize=8,
                color="white" if n > high else "black")
    ax.set(xticks=list(CLASSES), yticks=list(CLASSES), xlabel="predicted digit",
           ylabel="true digit",
           title=f"Confusion matrix, test accuracy {result.accuracy:.4f}\n{result.run_dir}")
    return _save(fig, plt, out)


def predict_files(run_dir: Path, paths: list[Path], console: Console | None = None) -> bool:
    """Print each file's predicted digit and top-3 probabilities; False if any file failed."""
    from dptrain.inference.digits import ImageError, prepare_file

    model, _config = load_model(run_dir)
    console = console or Console(highlight=False)
    table = Table(title=f"predictions of {run_dir}")
    for header in ("file", "digit", "top 3 (digit: probability)"):
        table.add_column(header, justify="left" if header == "file" else "right")
    failed = 0
    for path in paths:
        try:
            image = prepare_file(path)
        except ImageError as e:
            err(str(e))
            failed += 1
            continue
        probs = predict_proba(model, image[None])[0]
        top = np.argsort(probs)[::-1][:3]
        table.add_row(escape(str(path)), f"[bold]{top[0]}[/]",
                      "  ".join(f"{k}: {probs[k]:.3f}" for k in top))
    if failed < len(paths):
        console.print(table)
    return failed == 0
