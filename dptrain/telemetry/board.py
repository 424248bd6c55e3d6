"""--tensorboard: event files in RUN/tensorboard/ (rank 0), through torch's SummaryWriter.

Each epoch's record becomes scalars at step = epoch: every number in it, nested dicts as tag
paths (phase_seconds/mean/forward_backward), so a key that a later version adds to the records
appears without a change here. The resolved config is a text entry. A sweep's runs each write their own folder under the sweep's, so
`tensorboard --logdir SWEEP_DIR` shows them side by side.

tensorboard is an optional extra: `pip install -e ".[tensorboard]"`. No torch at import.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from dptrain.errors import UserError

EXTRA_HINT = 'pip install -e ".[tensorboard]" (or pip install tensorboard)'


def require_tensorboard() -> None:
    """A UserError naming the extra when the tensorboard package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not "
                        f"installed: {EXTRA_HINT}")


def scalars(record: dict, prefix: str = ""):
    """(tag, value) for every finite number in `record`, nested dicts as tag paths."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and key != "epoch":
            yield tag, value


class Board:
    def __init__(self, folder: Path, config_text: str):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        from dptrain.storage.runlog import storage_errors

        with storage_errors(folder):
            self.writer = SummaryWriter(log_dir=str(folder))
        # Four spaces: TensorBoard's text tab renders markdown, and the TOML as code.
        self.writer.add_text("config", "".join(f"    {line}\n"
                                               for line in config_text.splitlines()))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # one epoch at a time, so that a live TensorBoard follows the run

    def close(self) -> None:
        self.writer.close()
