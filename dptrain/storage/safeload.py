"""Loading files that may have come from anyone: no pickle of them can run code, and no read
takes more memory, or waits longer, than the file can legitimately need.

torch.load always runs with weights_only=True here, on a regular file whose zip archive has been
checked first (no compressed entries, no more declared bytes than the file holds, and no more
than the caller's model can need: a deflate bomb is refused before anything is decompressed).
Anything refused, or that cannot be read, is one line naming the file (LoadError). Files are
opened only when they are regular files (a FIFO, a device or /dev/zero never is), without
blocking, and read up to a bound. An fsdp checkpoint's files are read by safedcp.py.

No torch at module level: config.py and data.py read their files through here too.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

from dptrain.errors import UserError

# Room in a torch.save archive beyond its tensors' bytes: the pickle of the structure, the zip
# headers and the 64-byte alignment of each record (a default model's state.pt has ~30 KB).
ARCHIVE_OVERHEAD = 1 << 20


class LoadError(UserError):
    """A file that is refused, or that cannot be loaded: one line naming it."""


def open_regular(path: Path, *, follow_links: bool = True,
                 shown_as: str | None = None) -> IO[bytes]:
    """`path` opened for reading, binary, if it is a regular file; LoadError if not, naming it
    as `shown_as` (default: the path).

    Opened with O_NONBLOCK (a FIFO would otherwise block the open until a writer comes) and,
    unless `follow_links`, O_NOFOLLOW; the kind of file is checked on the open descriptor, so
    a file swapped in between a check and the open is seen.
    """
    name = str(path) if shown_as is None else shown_as
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if not follow_links and os.path.islink(path):
            raise LoadError(f"{name}: refused: a symbolic link, where dptrain writes a "
                            "file") from None
        raise LoadError(f"{name}: cannot read it ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LoadError(f"{name}: refused: {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_bounded(path: Path, limit: int, *, follow_links: bool = True,
                 shown_as: str | None = None) -> bytes:
    """The whole of regular file `path` (open_regular), refused in one line when it is larger
    than `limit` bytes: no more than that is ever read."""
    name = str(path) if shown_as is None else shown_as
    with open_regular(path, follow_links=follow_links, shown_as=name) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise LoadError(f"{name}: cannot read it ({e.strerror})") from None
    if len(data) > limit:
        raise LoadError(f"{name}: refused: larger than the {limit:,} bytes it can have")
    return data


def check_archive(file: IO[bytes], size: int, limit: int) -> None:
    """A torch.save zip archive of `size` bytes that torch.load may read within `limit` bytes:
    LoadError (without the file's name) if not.

    torch.load allocates each record at the size the zip's directory declares, and inflates
    a compressed one into it: 4 MB of deflate can declare 4 GB. torch.save never compresses,
    so a compressed record is refused, and together the records may declare no more bytes than
    the file holds (records that overlap would repeat its bytes) nor than `limit`.
    """
    if size > limit:
        raise LoadError(f"refused: {size:,} bytes, more than the {limit:,} it may take")
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
        raise LoadError(f"refused: not a torch.save archive ({first_line(e)})") from None
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise LoadError(f"refused: compressed records ({compressed[0]}), which torch.save never "
                        "writes (a decompression bomb?)")
    declared = sum(r.file_size for r in records)
    if declared > min(size, limit):
        raise LoadError(f"refused: its records declare {declared:,} bytes, in a file of "
                        f"{size:,} (limit {limit:,})")


def torch_load(path: Path, map_location: Any = "cpu", *, max_bytes: int,
               follow_links: bool = True) -> Any:
    """torch.load(path, weights_only=True) of a regular file whose archive passes
    check_archive(max_bytes); LoadError in one line if anything fails."""
    import torch

    with open_regular(path, follow_links=follow_links) as f:
        try:
            check_archive(f, os.fstat(f.fileno()).st_size, max_bytes)
        except LoadError as e:
            raise LoadError(f"{path}: {e}") from None
        f.seek(0)
        try:
            with warnings.catch_warnings():  # e.g. about a plain pickle's protocol: not one line
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise LoadError(f"{path}: refused: it holds more than tensors and plain values, or "
                            f"is corrupt ({weights_only_reason(e)})") from None
        except (RuntimeError, OSError, EOFError, ValueError, RecursionError) as e:
            raise LoadError(f"{path}: cannot load it ({first_line(e)})") from None


def weights_only_reason(error: Exception) -> str:
    """The useful words of torch's long weights_only message, e.g. 'Unsupported global: ...'."""
    text = str(error)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    detail = next((line.strip() for line in rest.splitlines() if line.strip()), "") if marker else ""
    return (detail or text.strip().splitlines()[0]).split(". ")[0][:200]


def nesting_depth(tree: Any) -> int:
    """How deeply lists and tables nest in parsed JSON or TOML (iterative: a tree too deep for
    a recursive walk is measured, not crashed on)."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list, tuple)):
            deepest = max(deepest, depth)
            todo += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
