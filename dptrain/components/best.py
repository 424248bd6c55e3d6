"""The best epoch and early stopping, as pure functions of the run's per-epoch records.

Every rank holds the same records (validation is reduced over the ranks), so every rank decides
alike without a collective; and a resumed run, which reads the records from its checkpoint,
decides as the uninterrupted run did. No torch.
"""

from __future__ import annotations

from dptrain.config import TrainConfig


def is_better(record: dict, than: dict | None, metric: str) -> bool:
    """Strictly better on `metric` (higher val_accuracy, lower val_loss); ties are not."""
    if than is None:
        return True
    if metric == "val_loss":
        return record[metric] < than[metric]
    return record[metric] > than[metric]


def best_record(records: list[dict], metric: str) -> dict | None:
    """The first epoch that no later one beat; None before the first epoch."""
    best = None
    for record in records:
        if is_better(record, best, metric):
            best = record
    return best


def is_new_best(records: list[dict], metric: str) -> bool:
    """The last epoch is better than every earlier one."""
    return bool(records) and best_record(records, metric) is records[-1]


def early_stop_reason(records: list[dict], train: TrainConfig) -> str:
    """Why the run stops after its last recorded epoch (--early-stop), in a few words; "" if
    it does not."""
    best = best_record(records, train.best_metric)
    if not train.early_stop or best is None:
        return ""
    waited = records[-1]["epoch"] - best["epoch"]
    if waited < train.early_stop:
        return ""
    return (f"{waited} epoch{'s' if waited != 1 else ''} without a better {train.best_metric} "
            f"than epoch {best['epoch']}'s "
            f"{best[train.best_metric]:.4f} (--early-stop {train.early_stop})")


def early_stop_line(records: list[dict], train: TrainConfig) -> str:
    """The line that says the run stops early after its last recorded epoch; "" if it does not."""
    reason = early_stop_reason(records, train)
    return f"stopping early after epoch {records[-1]['epoch']}: {reason}" if reason else ""
