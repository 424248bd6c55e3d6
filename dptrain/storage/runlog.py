"""The run folder (config.toml, metrics.jsonl, summary.json, model.pt) and rank-0 console output.

Every method is a no-op unless the log is active, which it is on global rank 0 only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from dptrain.config import RESOLVED_SECTION
from dptrain.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
MODEL = "model.pt"
CHECKPOINTS = "checkpoints"
STOPPED = "stopped.json"  # why training stopped with a user error (divergence, say)
LOCK = ".dptrain.lock"  # flock'ed by the run that owns the folder; holds its pid

# Set by the CLI for its workers, so that wall_seconds covers the whole command (epoch seconds).
LAUNCH_TIME_ENV = "DPTRAIN_LAUNCH_TIME"
# Set by the CLI for its workers when it holds the run folder's lock itself (one node): the
# resolved folder. Rank 0 takes the lock only when no launcher holds it for that folder.
LOCK_HELD_ENV = "DPTRAIN_OUT_LOCKED"

# A write that failed for these reasons is the disk's or the folder's doing, not the program's:
# one line (StorageError). Any other OSError stays a traceback.
_STORAGE_REASONS = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for its file system", errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EIO: "input/output error",
    errno.ELOOP: "a symbolic link where dptrain does not follow one",
}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # want of space: the run can go on later


class StorageError(UserError):
    """A run's file could not be written: the disk is full, the folder is read-only, ...
    `full`: for want of space (the run can go on once there is room)."""

    def __init__(self, message: str, *, full: bool = False):
        super().__init__(message)
        self.full = full


def storage_error(error: OSError, path) -> StorageError | None:
    """The one line for an OSError of the disk or the folder; None for any other OSError."""
    reason = _STORAGE_REASONS.get(error.errno)
    if reason is None:
        return None
    return StorageError(f"cannot write {path}: {reason}", full=error.errno in _FULL)


@contextmanager
def storage_errors(path):
    """Inside the block, an OSError of the disk or the folder becomes a StorageError naming `path`
    (or the file the error names)."""
    try:
        yield
    except OSError as e:
        problem = storage_error(e, e.filename or path)
        if problem is None:
            raise
        raise problem from None


def stopped_message(out: Path) -> str:
    """The user error that stopped the last attempt of the run in `out`; "" if none did."""
    stopped = read_json(out / STOPPED)
    message = stopped.get("message") if isinstance(stopped, dict) else None
    return message if isinstance(message, str) else ""


def command_start_time() -> float:
    """When the command began (epoch seconds): the CLI's start for the workers it launched,
    else when this process started.

    The process's start is read from /proc/self/stat (clock ticks after boot) against the
    boot-time clock, both to 10 ms; /proc/stat's boot time is whole seconds, which made
    wall_seconds up to a second too long. Rounded up a tick: never earlier than the start.
    """
    if os.environ.get(LAUNCH_TIME_ENV):
        return float(os.environ[LAUNCH_TIME_ENV])
    try:  # field 22 of /proc/self/stat: start time in clock ticks after boot
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - (ticks + 1) / os.sysconf("SC_CLK_TCK")
        return time.time() - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


# Columns of the console when output is not a terminal (a redirect, a sweep's *.log, SLURM):
# wide enough that no line wraps. Rich would otherwise break lines at 80 columns, mid-record.
LOG_WIDTH = 100_000


def make_console(**options) -> Console:
    """Rich console for stdout: a terminal's own width, or in a log, lines that never wrap."""
    console = Console(**options)
    return console if console.is_terminal else Console(width=LOG_WIDTH, **options)


def default_out_dir(mode: str) -> Path:
    """runs/<mode>-<timestamp>, with a suffix if a run started in the same second."""
    base = Path("runs") / f"{mode}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse what a fresh run in `out` must not replace: a finished or an unfinished run unless
    forced, and, forced or not, anything there that dptrain did not write (foreign_files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / SUMMARY).exists() and not force:
        raise UserError(f"--out {out} already holds a finished run ({SUMMARY}); choose another "
                        "folder, or pass --force to replace it")
    if (out / CHECKPOINTS).is_dir() and not force and any(
            p.name.startswith("epoch-") for p in (out / CHECKPOINTS).iterdir()):
        raise UserError(f"--out {out} holds the checkpoints of an unfinished run; continue it "
                        f"with --resume {out} (or --resume auto), or pass --force to start over")
    foreign = foreign_files(out, force)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"--out {out} holds {', '.join(foreign[:3])}{more}, which dptrain did "
                        "not write; a run replaces only an earlier run's files, even with "
                        "--force: move them away, or choose another folder")


# What a fresh run replaces or deletes in its folder: these files, and checkpoints/.
_REPLACED = (CONFIG, METRICS, SUMMARY, STOPPED, MODEL)
# A checkpoint folder's name, and that of its temporary folder (a crash mid-write leaves it).
_CHECKPOINT_NAME = re.compile(r"epoch-\d+")
_CHECKPOINT_TMP = re.compile(r"\.epoch-\d+\.tmp")
BEST = "best"  # checkpoints/best/epoch-NNNN/: the best epoch's checkpoint (--keep-best)
_MANIFEST_KEYS = {"epoch", "mode", "world_size", "config"}  # what every dptrain meta.json holds
_MANIFEST_BYTES = 64 << 20  # far above a manifest's size (its metrics grow ~300 B an epoch)


def foreign_files(out: Path, force: bool) -> list[str]:
    """What a fresh run would replace or delete in `out` that no dptrain run wrote there.

    dptrain's are: config.toml holding a run's [resolved] section; beside it, metrics.jsonl,
    summary.json, stopped.json and model.pt; and in checkpoints/ and checkpoints/best/,
    epoch-NNNN folders with a dptrain manifest and the temporary ones of a crashed write.
    Links count as foreign (nothing is written through one), but for a linked checkpoints/
    under --force: the link goes, never what it points to.
    """
    foreign = []
    ours = _is_run_config(out / CONFIG)
    for name in _REPLACED:
        path = out / name
        if os.path.lexists(path) and not (ours and _regular(path)):
            foreign.append(name)
    checkpoints = out / CHECKPOINTS
    if checkpoints.is_symlink():
        if not force:
            foreign.append(f"{CHECKPOINTS} (a symbolic link)")
    elif os.path.lexists(checkpoints):
        foreign += _foreign_checkpoints(checkpoints, CHECKPOINTS, best=True)
    return foreign


def _foreign_checkpoints(folder: Path, name: str, *, best: bool) -> list[str]:
    """What in a checkpoints folder (`name` relative to the run) is not a dptrain checkpoint."""
    if not _real_dir(folder):
        return [name]
    foreign = []
    for entry in sorted(folder.iterdir()):
        if best and entry.name == BEST and _real_dir(entry):
            foreign += _foreign_checkpoints(entry, f"{name}/{BEST}", best=False)
        elif not (_real_dir(entry) and (_CHECKPOINT_TMP.fullmatch(entry.name) or (
                _CHECKPOINT_NAME.fullmatch(entry.name) and _is_manifest(entry / "meta.json")))):
            foreign.append(f"{name}/{entry.name}")
    return foreign


def _regular(path: Path) -> bool:
    """A regular file, not a link to one (nor a FIFO, a device, ...)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def read_small(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes if it has at most `limit`; None for anything else (a link, a
    FIFO, a folder, a larger file, an unreadable one). Never blocks, never follows a link."""
    from dptrain.storage.safeload import LoadError, read_bounded

    try:
        return read_bounded(path, limit, follow_links=False)
    except LoadError:
        return None


# Bounds of the files a run writes, when they are read back from a folder (which anyone may
# have edited): far above what a run writes (a summary is a few KB; metrics.jsonl grows by
# about 1 KB an epoch with its phase times), far below what would exhaust memory.
SUMMARY_BYTES = 16 << 20
METRICS_BYTES = 256 << 20


def read_json(path: Path, limit: int = SUMMARY_BYTES) -> Any:
    """A JSON file of a run or sweep folder (summary.json, stopped.json, ...), parsed; None when
    it is not a regular file of at most `limit` bytes holding JSON nested at most 32 deep."""
    from dptrain.storage.safeload import nesting_depth

    data = read_small(path, limit)
    try:
        value = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return value if nesting_depth(value) <= 32 else None


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json (read_json); UserError in one line when it is not one."""
    summary = read_json(Path(run_dir) / SUMMARY)
    if not isinstance(summary, dict):
        raise UserError(f"{Path(run_dir) / SUMMARY}: not a run's summary (a regular JSON file "
                        "that dptrain writes); damaged?")
    return summary


def read_records(path: Path) -> list[dict]:
    """The complete records of a metrics.jsonl (bounded as read_json); a line still being
    written, or damaged, is not one. [] when the file is not there or not readable."""
    data = read_small(path, METRICS_BYTES)
    records = []
    for line in (data or b"").decode(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.endswith("}") else None
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_run_config(path: Path) -> bool:
    """config.toml as a run writes it: a TOML file with the run's [resolved] section."""
    import tomllib

    data = read_small(path, 1 << 20)
    try:
        resolved = tomllib.loads(data.decode()).get(RESOLVED_SECTION) if data else None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return False
    return isinstance(resolved, dict) and "mode" in resolved


def _is_manifest(path: Path) -> bool:
    """A checkpoint manifest as dptrain writes it (its keys, not its soundness: a damaged
    checkpoint of dptrain's is still dptrain's to replace)."""
    data = read_small(path, _MANIFEST_BYTES)
    try:
        meta = json.loads(data) if data else None
    except (ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and _MANIFEST_KEYS <= meta.keys()


def finished_epoch(out: Path) -> int | None:
    """The last epoch the finished run in `out` trained (its summary.json: epochs_trained, or
    epochs where an older summary has no such key); None if it has no summary."""
    data = read_small(Path(out) / SUMMARY, 1 << 20)
    try:
        summary = json.loads(data) if data else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(summary, dict):
        return None
    epoch = summary.get("epochs_trained", summary.get("epochs"))
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file.

    `write(f)` gets a binary file. The file's mode is what the user's umask gives a new file,
    as with `open` (a temporary file alone would be 0600, unreadable to teammates). A full disk
    or an unwritable folder is a StorageError naming `path`; the temporary file is removed.
    """
    with storage_errors(path):
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         delete=False) as tmp:
            stream = _WriteErrors(tmp)
            try:
                os.fchmod(tmp.fileno(), 0o666 & ~umask())
                write(stream)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException as e:
                os.unlink(tmp.name)
                if stream.error is not None and not isinstance(e, OSError):
                    # torch.save reports a failed write as "enforce fail ... unexpected pos":
                    # the OSError beneath says what happened (no space left, say).
                    raise stream.error from None
                raise
        os.replace(tmp.name, path)


class _WriteErrors:
    """A file whose failed writes are remembered, for writers that replace the OSError."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the above)
    os.umask(mask)
    return mask


class RunLock:
    """A run's claim on its folder while it runs: an flock on OUT/.dptrain.lock, which holds the
    holder's pid. The kernel drops the lock when the holder's process ends, by SIGKILL too, so
    a killed run never blocks the next one; the file itself stays (deleting it would race)."""

    def __init__(self, out: Path, kind: str = "run"):
        self.out = Path(out)
        self.kind = kind  # what holds the folder, for the message of the one refused: run, sweep
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the folder and take the lock, or raise a UserError naming the holder."""
        if os.environ.get(LOCK_HELD_ENV) == str(self.out.resolve()):
            return  # this process's launcher holds it, across torchrun's restarts
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"--out {self.out} is a file, not a folder") from None
        except OSError as e:
            reason = _STORAGE_REASONS.get(e.errno) or e.strerror
            raise UserError(f"--out {self.out}: cannot create the run folder ({reason})") from None
        path = self.out / LOCK
        with storage_errors(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            kind, holder = self._holder()
            raise UserError(f"--out {self.out} is in use by another {kind} ({holder}); "
                            "wait for it to end, or choose another folder") from None
        except OSError as e:  # a file system without locks (some NFS set-ups): go on unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                os.close(fd)
                raise
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": self.kind}
        try:
            with storage_errors(path):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(holder).encode())
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _holder(self) -> tuple[str, str]:
        """What holds the lock (run, sweep) and who, from the file it writes just after taking
        it."""
        for _ in range(40):
            try:
                holder = json.loads(read_small(self.out / LOCK, 4096) or b"")
                return (str(holder.get("kind", "run")),
                        f"pid {holder['pid']} on {holder['host']}, since {holder['since']}")
            except (ValueError, KeyError, TypeError, AttributeError):
                time.sleep(0.05)  # taken a moment ago: the pid is on its way
        return "run", "its pid is not recorded"


class RunLog:
    """Files and console of one run. Create on every rank; only the active one acts."""

    def __init__(self, out: Path, active: bool):
        self.out = Path(out)
        self.active = active
        self.console = make_console(highlight=False)
        self._metrics = None
        self._progress: Progress | None = None
        self._task = None

    def start(self, config_toml: str, records: list[dict], header: dict[str, Any]) -> None:
        """Create the folder, write config.toml, start metrics.jsonl with `records` (the epochs
        of the checkpoint a run resumes from; none for a fresh run), and print the plan."""
        if not self.active:
            return
        checkpoints = self.out / CHECKPOINTS
        if records and checkpoints.is_symlink():  # checked before anything is deleted
            raise UserError(f"{checkpoints} is a symbolic link: dptrain writes and deletes only "
                            "inside the run folder; move the checkpoints into it, or pass "
                            "--force to start over")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STOPPED).unlink(missing_ok=True)  # the last attempt's; this one goes on
        if not records:  # a fresh start (forced, if there were any): no old result may count
            # check_out_dir has made sure that all of these are an earlier run's.
            for stale in (SUMMARY, MODEL):
                (self.out / stale).unlink(missing_ok=True)
            if checkpoints.is_symlink():
                checkpoints.unlink()  # the link, never what it points to
            shutil.rmtree(checkpoints, ignore_errors=True)
        write_atomic(self.out / CONFIG, lambda f: f.write(config_toml.encode()))
        # Exactly the checkpoint's epochs: any later ones belong to the attempt being redone.
        write_atomic(self.out / METRICS,
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        with storage_errors(self.out / METRICS):
            self._metrics = open(self.out / METRICS, "a", buffering=1)
        self.console.print("[bold]dptrain[/] " + "  ".join(f"{k}={v}" for k, v in header.items()))
        if self.console.is_terminal:
            self._progress = progress_bar(self.console)
            self._task = self._progress.add_task("train", total=header["epochs"], metrics="",
                                                 rate="", completed=len(records))
            self._progress.start()

    def stopped(self, message: str) -> None:
        """Record why training stopped early: a restarted attempt reads it (stopped_message)."""
        if self.active:
            text = json.dumps({"message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            try:
                write_atomic(self.out / STOPPED, lambda f: f.write(text.encode()))
            except StorageError:
                pass  # a full disk, say: the run stops on that message all the same

    def note(self, text: str) -> None:
        """One line on the console (rich markup)."""
        if self.active:
            self.console.print(text, soft_wrap=True)  # one line, however long, for grep

    def epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's metrics (flushed at once) and show them."""
        if not self.active:
            return
        with storage_errors(self.out / METRICS):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        rate = f"{si(record['samples_per_second'])} samples/s"
        if self._progress is not None:
            # What matters most first: the bar cuts the rest off at the terminal's edge.
            text = (f"val_acc {record['val_accuracy']:.4f}  train_loss "
                    f"{record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
                    f"lr {record['lr']:.4g}  {record['epoch_seconds']:.2f}s")
            self._progress.update(self._task, advance=1, metrics=text, rate=rate)
        else:
            self.console.print(f"epoch {record['epoch']:>4}  train_loss {record['train_loss']:.4f}"
                               f"  val_loss {record['val_loss']:.4f}  val_acc "
                               f"{record['val_accuracy']:.4f}  lr {record['lr']:.4g}  "
                               f"{record['epoch_seconds']:.2f}s  {rate}")

    def finish(self, summary: dict[str, Any], state_dict: dict) -> None:
        """Write model.pt, then summary.json (its presence marks the run finished).

        A resumed run that extends a finished one kept that run's model.pt and summary.json
        until now: its summary goes first, so that a summary always describes the model.pt
        beside it (a crash in between leaves an unfinished run, which --resume finishes).
        """
        if not self.active:
            return
        import torch

        self.close()
        (self.out / SUMMARY).unlink(missing_ok=True)
        write_atomic(self.out / MODEL, lambda f: torch.save(state_dict, f))
        write_summary(self.out, summary)
        self.console.print(summary_table(summary))
        self.console.print(f"results in [bold]{self.out}[/]")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._metrics is not None:
            try:
                self._metrics.close()
            except OSError:
                pass  # the line it could not write was reported when it failed (a full disk)
            self._metrics = None


def progress_bar(console: Console) -> Progress:
    """The terminal's progress line: the epoch count, a short bar, the time left and the last
    epoch's samples/s always fit 80 columns (about 50 of them); the metrics fill what is left,
    cut with an ellipsis."""
    return Progress(TextColumn("[bold]epoch[/] {task.completed:>3}/{task.total}"),
                    BarColumn(bar_width=12), TimeRemainingColumn(compact=True),
                    TextColumn("{task.fields[rate]}", table_column=Column(min_width=15)),
                    TextColumn("{task.fields[metrics]}",
                               table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                    console=console, transient=False, expand=True)


def si(value: float) -> str:
    """A rate in 4 significant characters: 950, 41.2k, 1.35M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.0f}"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), in bytes.

    Not getrusage: after an exec, ru_maxrss still counts the process it was forked from. A
    worker forked by the CLI counts the pages it maps itself; those it shares untouched with
    the CLI process (torch's libraries) are counted in the CLI's own peak.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_atomic(out / SUMMARY, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['mode']} x {summary['world_size']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("test accuracy", f"{summary['test_accuracy']:.4f}"),
            ("test loss", f"{summary['test_loss']:.4f}"),
            ("val accuracy", f"{summary['val_accuracy']:.4f}"),
            ("epochs", f"{summary['epochs_trained']} of {summary['epochs']} (stopped early)"
             if summary.get("stopped_early") else str(summary["epochs"])),
            ("global batch", str(summary["global_batch"])),
            ("updates / epoch", str(summary["updates_per_epoch"])),
            ("lr", f"{summary['lr']:.6g}"),
            ("train seconds", f"{summary['train_seconds']:.2f}"),
            ("wall seconds", f"{summary['wall_seconds']:.2f}")]
    for name, value in rows:
        table.add_row(name, value)
    return table


def err(message: str) -> None:
    """One line on stderr, for user errors."""
    print(f"dptrain: error: {message}", file=sys.stderr, flush=True)
