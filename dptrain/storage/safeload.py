"""Loading files that may have come from anyone: no pickle of them can run code.

torch.load always runs with weights_only=True here, and anything it refuses, or cannot read,
is one line naming the file (LoadError). An fsdp checkpoint's files are read by safedcp.py.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from dptrain.errors import UserError


class LoadError(UserError):
    """A file that is refused, or that cannot be loaded: one line naming it."""


def torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(path, weights_only=True); LoadError in one line if it fails."""
    try:
        with warnings.catch_warnings():  # e.g. about a plain pickle's protocol: not one line
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise LoadError(f"{path}: refused: it holds more than tensors and plain values, or is "
                        f"corrupt ({weights_only_reason(e)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise LoadError(f"{path}: cannot load it ({first_line(e)})") from None


def weights_only_reason(error: Exception) -> str:
    """The useful words of torch's long weights_only message, e.g. 'Unsupported global: ...'."""
    text = str(error)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    detail = next((line.strip() for line in rest.splitlines() if line.strip()), "") if marker else ""
    return (detail or text.strip().splitlines()[0]).split(". ")[0][:200]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
