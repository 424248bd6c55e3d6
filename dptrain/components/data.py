"""MNIST: IDX files -> uint8 arrays (decoded once, cached, memory-mapped) -> the 60/20/20 split.

Where the four files come from, first match wins: --data-dir, then $DPTRAIN_DATA_DIR, then the
cache directory, which is filled from the public mirrors when it lacks them. numpy only: the
CLI prepares the data before any worker starts, without importing torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dptrain.errors import UserError
from dptrain.storage.runlog import umask, write_atomic

# The MD5 of each file's *uncompressed* bytes, so that .gz and raw copies are checked alike.
# Hand-written, with the stems: torchvision's table (used to download) holds the MD5s of the
# .gz files only, and importing it costs seconds on every start.
FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", (60000,)),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", (10000,)),
}
# Where a torchvision MNIST root (torchvision.datasets.MNIST(root)) keeps the files, below ROOT
# or below ROOT/MNIST.
TORCHVISION_LAYOUTS = (Path("MNIST") / "raw", Path("raw"))
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
RECORD_BYTES = 64 << 10  # the decoded cache's record: ~1 KB
N_SAMPLES = FILES["train_images"][2][0] + FILES["test_images"][2][0]
TRAIN_SAMPLES = int(N_SAMPLES * SPLIT_FRACTIONS[0])  # as split_indices draws them
N_PIXELS = 28 * 28
_IDX_UBYTE = 0x08


class DataError(UserError):
    """A missing, truncated or corrupt MNIST file, or a failed download."""


def cache_dir() -> Path:
    """$DPTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/dptrain, else ~/.cache/dptrain."""
    if os.environ.get("DPTRAIN_CACHE_DIR"):
        return Path(os.environ["DPTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dptrain"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, gzip-compressed or not, into a uint8 array."""
    # Hand-written, not torchvision's read_image_file: that returns torch tensors, and the CLI
    # decodes the data before it imports torch (and with precise errors for damaged files).
    return _parse_idx(_read_bytes(path, LARGEST_FILE), path)


def idx_bytes(shape: tuple[int, ...]) -> int:
    """The size of an uncompressed IDX file of unsigned bytes of this shape."""
    return 4 + 4 * len(shape) + int(np.prod(shape))


# The largest file MNIST has (the training images, 47 MB): no read may return more.
LARGEST_FILE = max(idx_bytes(shape) for _, _, shape in FILES.values())


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX file (truncated?)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 3:
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex()}, expected 0x00000801 "
                        "(labels) or 0x00000803 (images): not an MNIST IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: the header is cut short (truncated file)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its header {list(shape)} needs "
                        f"{expected} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes, gunzipped if it is gzip data: a regular file only (a FIFO would block),
    and never more than `limit` bytes, compressed or not (a gzip bomb stops there)."""
    from dptrain.storage.safeload import LoadError, open_regular

    try:
        with open_regular(path) as f:
            magic = f.read(2)
            f.seek(0)
            if magic != b"\x1f\x8b":
                data = f.read(limit + 1)
            else:
                with gzip.GzipFile(fileobj=f) as unzipped:
                    data = unzipped.read(limit + 1)  # inflates no further than that
    except LoadError as e:
        raise DataError(str(e)) from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: broken gzip data ({e}); the file is truncated or "
                        "corrupt") from None
    if len(data) > limit:
        raise DataError(f"{path}: holds more than the {limit:,} bytes of the MNIST file it "
                        "should be; the file is corrupt or not MNIST: replace it")
    return data


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(data_dir: str = "") -> tuple[Path, str]:
    """The directory to read MNIST from and where that choice came from.

    A directory named by the flag or the environment must hold the files, itself or as a
    torchvision root (ROOT/MNIST/raw); only the cache directory is ever filled by downloading.
    """
    for directory, origin in ((data_dir, "--data-dir"),
                              (os.environ.get("DPTRAIN_DATA_DIR", ""), "$DPTRAIN_DATA_DIR")):
        if directory:
            path = Path(directory).expanduser()
            if path.exists() and not path.is_dir():
                raise DataError(f"{origin} {path} is a file, not a folder; point {origin} at "
                                "the folder that holds the four MNIST files")
            if not path.is_dir():
                raise DataError(f"MNIST directory {path} (from {origin}) does not exist; point "
                                f"{origin} at a folder with the four MNIST files, or unset it "
                                f"to download them into {cache_dir() / 'mnist'}")
            return _mnist_folder(path), origin
    return cache_dir() / "mnist", "cache"


def recorded_location(data_dir: str = "", *, typed: bool = True) -> tuple[str, str]:
    """(the folder MNIST will be read from, as an absolute path, and a note or "").

    A run records that path as its config's data_dir, so that `evaluate`, `--resume` and the
    config reused as --config find the same files from any folder or shell. typed: data_dir was
    given as --data-dir, and must hold MNIST. Otherwise it was read back from a config file or a
    run, where it says where the files were then: if they have moved, the usual lookup
    ($DPTRAIN_DATA_DIR, then the cache) takes over, and the note says so.
    """
    if data_dir and not typed and not _holds_mnist(Path(data_dir).expanduser()):
        directory, origin = locate("")
        return (os.path.abspath(directory),
                f"the recorded data_dir {data_dir} no longer holds the MNIST files; reading "
                f"them from {os.path.abspath(directory)} ({origin}) instead")
    directory, _ = locate(data_dir)
    return os.path.abspath(directory), ""


def _holds_mnist(path: Path) -> bool:
    folder = _mnist_folder(path)
    return all(_find_file(folder, stem) for stem, _, _ in FILES.values())


def _mnist_folder(path: Path) -> Path:
    """`path` itself, or the raw folder of a torchvision root below it, whichever holds MNIST's
    files (`path` when none does, so that the error names the folder given)."""
    for folder in (path, *(path / layout for layout in TORCHVISION_LAYOUTS)):
        if any(_find_file(folder, stem) for stem, _, _ in FILES.values()):
            return folder
    return path


def source_files(directory: Path, origin: str) -> dict[str, Path]:
    """The four files in `directory`, downloading into it first when it is the cache."""
    found = {key: _find_file(directory, stem) for key, (stem, _, _) in FILES.items()}
    missing = [FILES[key][0] for key, path in found.items() if path is None]
    if missing and origin == "cache":
        download(directory, missing)
        return source_files(directory, "downloaded")
    if missing:
        raise DataError(f"MNIST file {missing[0]}(.gz) is missing from {directory} (from "
                        f"{origin}); it needs all four of {', '.join(s for s, _, _ in FILES.values())}, "
                        "gzip-compressed or not")
    return found


def download(directory: Path, stems: list[str], mirrors: tuple[str, ...] | None = None) -> None:
    """Fetch `stems` (.gz) into `directory` with torchvision's downloader, from the first of its
    MNIST mirrors ($DPTRAIN_MNIST_MIRRORS, space-separated, replaces them) that has each file,
    checked against torchvision's MD5 of the .gz and ours of its content."""
    from torchvision.datasets import MNIST  # seconds to import: only when downloading

    mirrors = mirrors or tuple(os.environ.get("DPTRAIN_MNIST_MIRRORS", "").split()) or \
        tuple(MNIST.mirrors)
    gz_md5 = dict(MNIST.resources)
    directory.mkdir(parents=True, exist_ok=True)
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # torchvision's downloader sets none: a stalled mirror would hang
    try:
        for stem in stems:
            _download_one(directory, stem, mirrors, gz_md5[f"{stem}.gz"])
    finally:
        socket.setdefaulttimeout(timeout)


def _download_one(directory: Path, stem: str, mirrors: tuple[str, ...], gz_md5: str) -> None:
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{stem}.gz"
        try:
            _fetch_verified(url, directory / f"{stem}.gz", gz_md5)
            return
        except (OSError, urllib.error.URLError, DataError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise DataError(f"could not download {stem}.gz ({'; '.join(errors)}); without internet, put "
                    "the four MNIST files in a folder and pass --data-dir DIR or set "
                    "DPTRAIN_DATA_DIR")


def _fetch_verified(url: str, target: Path, gz_md5: str) -> None:
    """Download into a private folder beside `target`; only a verified file is moved into place."""
    from torchvision.datasets.utils import download_url

    stem = target.name.removesuffix(".gz")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        try:
            download_url(url, tmp, target.name, md5=gz_md5)
        except RuntimeError as e:  # torchvision's "File not found or corrupted."
            raise DataError(f"{url}: checksum mismatch, the download is corrupt ({e})") from None
        fetched = Path(tmp) / target.name
        md5, shape = next((md5, shape) for s, md5, shape in FILES.values() if s == stem)
        _check_md5(_read_bytes(fetched, idx_bytes(shape)), md5, shown_as=url)
        os.chmod(fetched, 0o666 & ~umask())
        os.replace(fetched, target)


def _check_md5(raw: bytes, md5: str, shown_as: str | Path) -> None:
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise DataError(f"{shown_as}: checksum mismatch (md5 of the uncompressed data is {got}, "
                        f"expected {md5}); the file is corrupt or not the original MNIST: "
                        "replace it with a fresh copy")


@dataclass(frozen=True)
class Mnist:
    """All 70,000 images (uint8, N x 784, usually memory-mapped) and labels, train file first."""

    images: np.ndarray
    labels: np.ndarray


def load_mnist(data_dir: str = "") -> Mnist:
    """Locate, verify and decode MNIST, reusing a decoded cache keyed by the source files."""
    directory, origin = locate(data_dir)
    sources = source_files(directory, origin)
    paths = _cache_paths(_cache_key(sources))
    mnist = _load_cache(paths)
    if mnist is None:  # none yet, or damaged: decode again
        mnist = decode(sources)
        _save_cache(paths, mnist, sources)
    return mnist


def decode(sources: dict[str, Path]) -> Mnist:
    """Verify each file's checksum and concatenate train and test into one set."""
    arrays = {}
    for key, path in sources.items():
        stem, md5, shape = FILES[key]
        raw = _read_bytes(path, idx_bytes(shape))
        arrays[key] = _parse_idx(raw, path)  # first, for its precise truncated/magic errors
        _check_md5(raw, md5, shown_as=path)
        if arrays[key].shape != shape:  # unreachable with a matching MD5, kept as a guard
            raise DataError(f"{path}: shape {arrays[key].shape}, expected {shape}")
    images = np.concatenate([arrays["train_images"], arrays["test_images"]]).reshape(-1, N_PIXELS)
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    return Mnist(images, labels)


def _cache_key(sources: dict[str, Path]) -> str:
    """Changes whenever a source file is replaced, so a stale decode is never used."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources.values()]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]


def _cache_paths(key: str) -> dict[str, Path]:
    decoded = cache_dir() / "decoded"
    return {"images": decoded / f"images-{key}.npy", "labels": decoded / f"labels-{key}.npy",
            "record": decoded / f"mnist-{key}.json"}


def _load_cache(paths: dict[str, Path]) -> Mnist | None:
    """The decoded arrays, memory-mapped, when they are exactly what was written; else None.

    The record beside them (written last) holds the source files' MD5s and each array file's
    size and SHA-256, with the file's stat (size, times, inode) when its hash was last
    confirmed. Any write changes that stat, so an unchanged one is trusted for free; a changed
    one is hashed again (the 55 MB of images: ~35 ms here) and the cache rebuilt on mismatch.
    """
    from dptrain.storage.safeload import read_bounded

    try:
        record = json.loads(read_bounded(paths["record"], RECORD_BYTES))
        if record["sources"] != {stem: md5 for stem, md5, _ in FILES.values()}:
            return None
        confirmed = [_intact(paths[name], record["arrays"][name]) for name in ("images", "labels")]
        if not all(confirmed):
            return None
        # copy-on-write: writable for torch.from_numpy, shared page cache until written
        mnist = Mnist(*(np.load(paths[name], mmap_mode="c") for name in ("images", "labels")))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UserError):
        return None  # a FIFO or a huge file in its place included: read_bounded refuses them
    n = sum(shape[0] for _, _, shape in FILES.values()) // 2  # train + test samples
    if (mnist.images.shape != (n, N_PIXELS) or mnist.labels.shape != (n,)
            or mnist.images.dtype != np.uint8 or mnist.labels.dtype != np.uint8
            or int(mnist.labels.max()) > 9):
        return None
    if record != json.loads(read_bounded(paths["record"], RECORD_BYTES)):  # a stat renewed
        _write_record(paths["record"], record)
    return mnist


def _intact(path: Path, entry: dict) -> bool:
    """`path` still has the size and SHA-256 of `entry`; renews entry["stat"] when re-hashed."""
    now = _stat(path)
    if now == entry["stat"]:
        return True
    if now[0] != entry["bytes"] or _sha256(path) != entry["sha256"]:
        return False
    entry["stat"] = now
    return True


def _stat(path: Path) -> list[int]:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block np.load; nothing else is the cache
        raise ValueError(f"{path} is not a regular file")
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    from dptrain.storage.safeload import open_regular

    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _save_cache(paths: dict[str, Path], mnist: Mnist, sources: dict[str, Path]) -> None:
    """Best effort: an unwritable cache costs a decode per run, nothing more. Each file is
    replaced atomically (ranks racing here all see whole files); the record comes last."""
    record = {"sources": {stem: md5 for stem, md5, _ in FILES.values()},
              "source_files": {key: str(path) for key, path in sources.items()}, "arrays": {}}
    try:
        paths["record"].parent.mkdir(parents=True, exist_ok=True)
        for name, array in (("images", mnist.images), ("labels", mnist.labels)):
            write_atomic(paths[name], lambda f: np.save(f, array))
            record["arrays"][name] = {"bytes": paths[name].stat().st_size,
                                      "sha256": _sha256(paths[name]), "stat": _stat(paths[name])}
        _write_record(paths["record"], record)
    except (OSError, UserError):
        pass


def _write_record(path: Path, record: dict) -> None:
    try:
        write_atomic(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    except UserError:  # a read-only or full cache: the next start checks the hashes again
        pass


@dataclass(frozen=True)
class Split:
    """Row indices into Mnist for train, val and test (42,000 / 14,000 / 14,000)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(n: int, seed: int) -> Split:
    """A fixed, seeded 60/20/20 split of n samples, the same in every mode and world size."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(n * SPLIT_FRACTIONS[0])
    n_val = int(n * SPLIT_FRACTIONS[1])
    return Split(order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; shares differ by at most one."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def epoch_order(train: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The train rows in this epoch's shuffled order; identical on every rank."""
    return train[np.random.default_rng([seed, epoch]).permutation(len(train))]
