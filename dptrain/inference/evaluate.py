"""A trained model in use: `dptrain evaluate` (the test split) and `dptrain predict` (your images).

Both rebuild the plain MLP in this process, whichever mode trained it (no process group), from
a finished run (model.pt and config.toml), a checkpoint folder (also of a run still training),
or a bare model.pt (`load` says how each is read).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dptrain.config import ACTIVATIONS, Config, ModelConfig, build_config, read_toml
from dptrain.errors import UserError
from dptrain.storage.runlog import CHECKPOINTS, CONFIG, MODEL, err

CLASSES = range(10)
# What evaluate and predict take, for their --help and their errors.
SOURCES = ("the folder of a run, a checkpoint folder (RUN/checkpoints/epoch-NNNN or best) or a "
           "model.pt")


@dataclass(frozen=True)
class Loaded:
    """A model ready to use (eval mode), the config it was trained with and where it came from."""

    model: object
    config: Config
    source: str  # e.g. "runs/a/checkpoints/best/epoch-0007, epoch 7"


def load_model(source: Path, activation: str | None = None):
    """(MLP in eval mode, its Config) of `source` (see `load`)."""
    loaded = load(source, activation)
    return loaded.model, loaded.config


def load(source: Path, activation: str | None = None) -> Loaded:
    """The model of `source`:

    - a finished run folder: its model.pt, built as its config.toml says;
    - a run folder without model.pt (still training, or stopped): its newest checkpoint;
    - a checkpoint folder, RUN/checkpoints/epoch-NNNN or RUN/checkpoints/best;
    - a .pt file: a model.pt. Its layer widths are read from its tensors' shapes; its
      activation from its run's config.toml beside it (RUN/model.pt), else from `activation`,
      which is then required: a wrong guess would give wrong answers without an error.
    `activation` is refused where a config names the activation.
    """
    from dptrain.storage import checkpoint

    source = Path(source)
    if source.is_file():
        return _load_file(source, activation)
    if activation is not None:
        raise UserError(f"--activation is for a model.pt without its run's {CONFIG}; {source} "
                        "is a run or checkpoint folder, whose config names the activation")
    if checkpoint.names_a_checkpoint(source):  # find says why one is not there
        return _from_checkpoint(checkpoint.find(source))
    if not source.exists():
        raise UserError(f"{source} does not exist; give {SOURCES}")
    if (source / MODEL).exists():
        return _load_file(source / MODEL, None)
    found, _ = checkpoint.latest(source)
    if found is None:
        missing = MODEL if (source / CONFIG).exists() else CONFIG
        raise UserError(f"{source}: no {missing} here, and no complete checkpoint in "
                        f"{source / CHECKPOINTS}{checkpoint.best_hint(source)}; give {SOURCES}")
    return _from_checkpoint(found, " (its newest checkpoint: the run has no model.pt yet)")


def _from_checkpoint(found, why: str = "") -> Loaded:
    from dptrain.storage.checkpoint import META, model_of

    config = build_config(found.meta["config"], source=str(found.path / META))
    return Loaded(model_of(found).eval(), config, f"{found.path}, epoch {found.epoch}{why}")


def _load_file(path: Path, activation: str | None) -> Loaded:
    """A model.pt: its run's, when it is RUN/model.pt beside RUN/config.toml; else bare.

    The file may come from anyone: it is loaded (weights_only, a bounded archive) only into a
    model this machine has room for, and must hold exactly that model's tensors, all finite.
    """
    from dptrain.components.memory import available_bytes, estimate_memory, require_memory
    from dptrain.components.model import MLP
    from dptrain.storage.safeload import ARCHIVE_OVERHEAD, torch_load
    from dptrain.storage.statecheck import StateMismatch, check_state, tensor_bytes

    if path.suffix != ".pt":
        raise UserError(f"{path} is a file, not a run folder or a .pt model file; give {SOURCES}")
    config_file = path.parent / CONFIG
    state = None
    if path.name == MODEL and config_file.exists():
        if activation is not None:
            raise UserError(f"--activation is for a model.pt without its run's {CONFIG}; "
                            f"{config_file} names the activation")
        config = build_config(read_toml(config_file), source=str(config_file))
        what = f"the model of {CONFIG} (hidden {list(config.model.hidden)})"
    else:
        if activation is None:
            raise UserError(f"{path}: no run's {CONFIG} beside it names the activation its model "
                            f"was trained with; pass --activation {'|'.join(ACTIVATIONS)}")
        if activation not in ACTIVATIONS:
            raise UserError(f"--activation: expected one of {', '.join(ACTIVATIONS)}, got "
                            f"{activation!r}")
        # Its widths come from its tensors: the file bounds them (no record may declare more
        # than it holds), and the memory this machine has free.
        state = torch_load(path, max_bytes=available_bytes() or path.stat().st_size)
        config = Config(model=ModelConfig(hidden=_widths(state, path), activation=activation))
        what = "a model"
    require_memory(estimate_memory(config, per_rank_batch=0, training=False), config,
                   what=str(path))
    model = MLP(config.model.hidden, config.model.activation)
    expected = model.state_dict()
    if state is None:
        state = torch_load(path, max_bytes=tensor_bytes(expected) + ARCHIVE_OVERHEAD)
    try:
        check_state(state, expected)
    except StateMismatch as e:  # another shape (config.toml edited?), NaN, not a state
        raise UserError(f"{path}: cannot load it into {what}: {e.problem}") from None
    model.load_state_dict(state)
    widths = "-".join(map(str, (784, *config.model.hidden, 10)))
    return Loaded(model.eval(), config, f"{path} ({widths}, {config.model.activation})")


def _widths(state, path: Path) -> tuple[int, ...]:
    """The hidden layer sizes of an MLP's state dict, from its weights' shapes (out x in)."""
    layers = 0
    while isinstance(state, dict) and f"layers.{layers}.weight" in state:
        layers += 1
    weights = [state[f"layers.{i}.weight"] for i in range(layers)]
    if layers < 2 or any(getattr(w, "ndim", 0) != 2 for w in weights):
        raise UserError(f"{path}: not the state of a dptrain model (layers.0.weight, "
                        "layers.1.weight, ...: 2-D weights)")
    return tuple(int(w.shape[0]) for w in weights[:-1])


def predict_proba(model, images: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Softmax probabilities (N x 10) of float images in [0, 1], shape N x 28 x 28 or N x 784."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1))
    with torch.no_grad():
        return torch.cat([torch.softmax(model(part), dim=1) for part in x.split(batch)]).numpy()


@dataclass(frozen=True)
class Evaluation:
    source: str  # what was evaluated (Loaded.source)
    confusion: np.ndarray  # [true, predicted] counts over the test split

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.confusion.sum())


def evaluate_run(source: Path, data_dir: str | None = None,
                 activation: str | None = None) -> Evaluation:
    """The model of `source` (load) on its run's test split (the split seed of its config;
    of a bare model.pt, the default split, which every run uses unless told otherwise)."""
    from dptrain.components.data import load_mnist, recorded_location, split_indices

    loaded = load(source, activation)
    model, config = loaded.model, loaded.config
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
    return Evaluation(loaded.source, confusion)


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
                  f"({int(np.trace(result.confusion))} of {total} test images) — {escape(result.source)}")
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
           title=f"Confusion matrix, test accuracy {result.accuracy:.4f}\n{result.source}")
    return _save(fig, plt, out)


def predict_files(source: Path, paths: list[Path], console: Console | None = None, *,
                  as_json: bool = False, activation: str | None = None) -> bool:
    """Print each file's predicted digit and top-3 probabilities, as one table, or with
    `as_json` as one JSON object per file, in order (a failed file's has its "error"); a
    failed file also gets its error line on stderr. False if any file failed."""
    import json

    from dptrain.inference.digits import ImageError, prepare_file

    loaded = load(source, activation)
    console = console or Console(highlight=False)
    table = Table(title=f"predictions of {escape(loaded.source)}")
    for header in ("file", "digit", "top 3 (digit: probability)"):
        table.add_column(header, justify="left" if header == "file" else "right")
    failed = 0
    for path in paths:
        try:
            image = prepare_file(path)
        except ImageError as e:
            err(str(e))
            failed += 1
            if as_json:
                print(json.dumps({"file": str(path), "error": str(e)}), file=console.file,
                      flush=True)
            continue
        probs = predict_proba(loaded.model, image[None])[0]
        top = np.argsort(probs)[::-1][:3]
        if as_json:  # plain print: never wrapped, no markup
            print(json.dumps({"file": str(path), "digit": int(top[0]),
                              "probabilities": [float(p) for p in probs]}),
                  file=console.file, flush=True)
        else:
            table.add_row(escape(str(path)), f"[bold]{top[0]}[/]",
                          "  ".join(f"{k}: {probs[k]:.3f}" for k in top))
    if failed < len(paths) and not as_json:
        console.print(table)
    return failed == 0
