import functools
import gzip
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import MNIST_DIR, write_idx
from dptrain.components import data
from dptrain.components.data import (DataError, epoch_order, load_mnist, read_idx, shard_bounds,
                                     split_indices)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("name", ["x-idx3-ubyte.gz", "x-idx3-ubyte"])
def test_read_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, images)), images)
    labels = np.arange(7, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l-idx1-ubyte", labels)), labels)


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x03" + bytes(100))  # dtype 0x0d (float) is not MNIST's
    with pytest.raises(DataError, match="wrong magic number 0x00000d03"):
        read_idx(path)


def test_truncated_file(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"needs 7856 \(truncated or corrupt file\)"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte.gz", np.ones((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="broken gzip data"):
        read_idx(path)


def fake_mnist(directory, *, n=4):
    """The four files with MNIST's names and magic but made-up (so mis-checksummed) content."""
    directory.mkdir(exist_ok=True)
    for stem, _, shape in data.FILES.values():
        write_idx(directory / f"{stem}.gz", np.zeros((n, *shape[1:]), np.uint8))
    return directory


def test_checksum_mismatch_names_the_file(tmp_path):
    directory = fake_mnist(tmp_path / "fake")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        load_mnist(str(directory))


def test_missing_file_names_it_and_the_fix(tmp_path):
    directory = fake_mnist(tmp_path / "fake")
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\(.gz\) is missing from .* --data-dir") as e:
        load_mnist(str(directory))
    assert "t10k-labels-idx1-ubyte, gzip-compressed or not" in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(str(tmp_path / "nowhere"))


def test_a_file_given_as_the_data_dir_is_called_a_file(tmp_path):
    archive = write_idx(tmp_path / "some.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"--data-dir .*some.gz is a file, not a folder") as e:
        load_mnist(str(archive))
    assert "does not exist" not in str(e.value)


def torchvision_root(root, source=None):
    """ROOT/MNIST/raw as torchvision.datasets.MNIST(ROOT, download=True) leaves it: each .gz
    beside its extracted copy (links to the real files, or fake_mnist's)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if source is None:
        return fake_mnist(raw)
    for stem, _, _ in data.FILES.values():
        (raw / f"{stem}.gz").symlink_to(source / f"{stem}.gz")
        (raw / stem).write_bytes(gzip.decompress((source / f"{stem}.gz").read_bytes()))
    return raw


def test_a_torchvision_root_is_a_data_dir(tmp_path):
    raw = torchvision_root(tmp_path / "root", MNIST_DIR)
    assert data.locate(str(tmp_path / "root")) == (raw, "--data-dir")
    assert data.locate(str(tmp_path / "root" / "MNIST")) == (raw, "--data-dir")
    assert data.locate(str(raw)) == (raw, "--data-dir")
    assert np.array_equal(load_mnist(str(tmp_path / "root")).labels, load_mnist().labels)
    # A damaged root is reported with the file inside it.
    torchvision_root(tmp_path / "fake")
    with pytest.raises(DataError, match=r"fake/MNIST/raw/train-images-idx3-ubyte.gz: checksum"):
        load_mnist(str(tmp_path / "fake"))


def test_names_agree_with_torchvision_and_the_cli_does_not_import_it():
    from torchvision.datasets import MNIST

    assert {name for name, _ in MNIST.resources} == {f"{s}.gz" for s, _, _ in data.FILES.values()}
    code = "import sys, dptrain.cli, dptrain.components.data; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_location_recorded_is_absolute_and_a_moved_one_falls_back(tmp_path, monkeypatch):
    raw = torchvision_root(tmp_path / "root", MNIST_DIR)
    monkeypatch.chdir(tmp_path)
    # A relative --data-dir, and $DPTRAIN_DATA_DIR (data_dir ""), become the folder found.
    assert data.recorded_location("root") == (str(raw), "")
    assert data.recorded_location("") == (str(MNIST_DIR), "")
    # Read back from a run or a config file: still there, or moved (the usual lookup, said).
    assert data.recorded_location(str(raw), typed=False) == (str(raw), "")
    shutil.move(tmp_path / "root", tmp_path / "moved")
    found, note = data.recorded_location(str(raw), typed=False)
    assert found == str(MNIST_DIR)
    assert note == (f"the recorded data_dir {raw} no longer holds the MNIST files; reading them "
                    f"from {MNIST_DIR} ($DPTRAIN_DATA_DIR) instead")
    with pytest.raises(DataError, match="does not exist"):  # typed: a mistake to report
        data.recorded_location(str(raw))


def test_a_run_records_its_data_and_is_evaluated_after_the_data_moved(trained_run, tmp_path,
                                                                       capsys):
    import json

    from dptrain.config import read_toml
    from dptrain.inference.evaluate import evaluate_run

    # Trained with $DPTRAIN_DATA_DIR: config.toml says where that was.
    config = (trained_run / "config.toml").read_text()
    assert read_toml(trained_run / "config.toml")["data"]["data_dir"] == str(MNIST_DIR)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "model.pt", run)
    (run / "config.toml").write_text(config.replace(f'"{MNIST_DIR}"', f'"{tmp_path / "gone"}"'))
    accuracy = evaluate_run(run).accuracy
    assert "no longer holds the MNIST files" in capsys.readouterr().err
    summary = json.loads((trained_run / "summary.json").read_text())
    assert round(accuracy * 14000) == round(summary["test_accuracy"] * 14000)


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_DATA_DIR", str(tmp_path))
    (tmp_path / "flag").mkdir()
    assert data.locate(str(tmp_path / "flag")) == (tmp_path / "flag", "--data-dir")
    assert data.locate("") == (tmp_path, "$DPTRAIN_DATA_DIR")
    monkeypatch.delenv("DPTRAIN_DATA_DIR")
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path / "c"))
    assert data.locate("") == (tmp_path / "c" / "mnist", "cache")


def test_real_mnist_facts_and_decode_cache():
    mnist = load_mnist()
    assert mnist.images.shape == (70000, 784) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels[:60000]).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.labels[60000:]).tolist() == TEST_COUNTS
    assert float(mnist.images[:60000].mean()) == pytest.approx(33.32, abs=0.01)
    again = load_mnist()  # from the decode cache: memory-mapped, not decoded again
    assert isinstance(again.images, np.memmap)
    assert np.array_equal(again.labels, mnist.labels)


def damage_zeroed_images(paths):
    images = np.load(paths["images"], mmap_mode="r+")
    images[:] = 0
    images.flush()


def damage_a_label_of_200(paths):
    labels = np.load(paths["labels"], mmap_mode="r+")
    labels[5] = 200
    labels.flush()


def damage_short_labels(paths):
    np.save(paths["labels"], np.load(paths["labels"])[:-100])


def damage_the_record(paths):
    paths["record"].write_text("{not json")


@pytest.mark.parametrize("damage", [damage_zeroed_images, damage_a_label_of_200,
                                    damage_short_labels, damage_the_record])
def test_a_damaged_decode_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path))
    good = load_mnist()
    (paths,) = [data._cache_paths(p.stem.split("-", 1)[1])
                for p in (tmp_path / "decoded").glob("mnist-*.json")]
    damage(paths)
    rebuilt = load_mnist()
    assert not isinstance(rebuilt.images, np.memmap)  # decoded afresh
    assert np.array_equal(rebuilt.labels, good.labels)
    assert float(rebuilt.images.mean()) == pytest.approx(float(good.images.mean()))
    assert isinstance(load_mnist().images, np.memmap)  # and cached again


def test_the_cache_is_hashed_only_when_its_files_changed(tmp_path, monkeypatch):
    """Every start checks size, times and inode (free); the SHA-256 (~35 ms for the images)
    only when those changed, and a file that still matches is trusted again."""
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path))
    load_mnist()
    real, hashed = data._sha256, []
    monkeypatch.setattr(data, "_sha256", lambda path: hashed.append(path.name) or real(path))
    assert isinstance(load_mnist().images, np.memmap) and hashed == []
    (images,) = (tmp_path / "decoded").glob("images-*.npy")
    os.utime(images)  # a new mtime, the same bytes
    assert isinstance(load_mnist().images, np.memmap) and hashed == [images.name]
    assert isinstance(load_mnist().images, np.memmap) and hashed == [images.name]


def test_the_suite_finds_mnist_as_the_cli_does(tmp_path, monkeypatch, mirror):
    """$DPTRAIN_DATA_DIR, else the cache, filled once from a mirror (here a local one)."""
    import conftest

    monkeypatch.setenv("DPTRAIN_DATA_DIR", str(tmp_path / "nowhere"))
    assert conftest.mnist_location()[0] is None
    raw = torchvision_root(tmp_path / "root", MNIST_DIR)
    monkeypatch.setenv("DPTRAIN_DATA_DIR", str(tmp_path / "root"))
    assert conftest.mnist_location() == (raw, "$DPTRAIN_DATA_DIR")
    monkeypatch.delenv("DPTRAIN_DATA_DIR")
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DPTRAIN_MNIST_MIRRORS", f"{mirror}/good/")
    folder, origin = conftest.mnist_location()
    assert (folder, origin) == (tmp_path / "cache" / "mnist", "cache")
    conftest.provide_mnist(folder, origin)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{stem}.gz" for stem, _, _ in data.FILES.values())


def test_uncompressed_copy_loads_too(tmp_path):
    for stem, _, _ in data.FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((MNIST_DIR / f"{stem}.gz").read_bytes()))
    assert load_mnist(str(tmp_path)).labels[:5].tolist() == load_mnist().labels[:5].tolist()


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP stand-in for an MNIST mirror, serving a folder of ours."""
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    for stem, _, _ in data.FILES.values():
        shutil.copy(MNIST_DIR / f"{stem}.gz", root / "good")
    fake_mnist(root / "corrupt")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_download_into_cache_falls_back_to_the_next_mirror(tmp_path, monkeypatch, mirror):
    monkeypatch.delenv("DPTRAIN_DATA_DIR")
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DPTRAIN_MNIST_MIRRORS", f"{mirror}/missing/ {mirror}/good/")
    mnist = load_mnist()
    assert np.bincount(mnist.labels[60000:]).tolist() == TEST_COUNTS
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(
        f"{stem}.gz" for stem, _, _ in data.FILES.values())


def test_corrupt_download_is_rejected_and_not_kept(tmp_path, monkeypatch, mirror):
    monkeypatch.delenv("DPTRAIN_DATA_DIR")
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DPTRAIN_MNIST_MIRRORS", f"{mirror}/corrupt/")
    with pytest.raises(DataError, match="could not download train-images.*checksum mismatch.*--data-dir"):
        load_mnist()
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_split_is_fixed_disjoint_and_60_20_20():
    a, b = split_indices(70000, 0), split_indices(70000, 0)
    assert (len(a.train), len(a.val), len(a.test)) == (42000, 14000, 14000)
    assert all(np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))
    everything = np.concatenate([a.train, a.val, a.test])
    assert np.array_equal(np.sort(everything), np.arange(70000))
    assert not np.array_equal(split_indices(70000, 1).train, a.train)


def test_shards_cover_a_batch_exactly_once():
    for n, world in [(1024, 2), (1023, 2), (16, 3), (5, 8)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_epoch_order_is_shared_and_changes_each_epoch():
    train = split_indices(70000, 0).train
    assert np.array_equal(epoch_order(train, 0, 1), epoch_order(train, 0, 1))
    assert not np.array_equal(epoch_order(train, 0, 1), epoch_order(train, 0, 2))
    assert np.array_equal(np.sort(epoch_order(train, 0, 3)), np.sort(train))


def test_a_gzip_bomb_is_cut_off_at_the_size_of_an_mnist_file(tmp_path):
    """4 MB of .gz that inflate to 4 GB reached 8.9 GB of memory before its error (issue 20);
    here the same kind of file, 120 MB inflated, is read no further than the largest MNIST
    file (47 MB), and refused."""
    import tracemalloc

    member = gzip.compress(b"\0" * (8 << 20), compresslevel=1)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 60000, 28, 28)) + member * 15)
    assert bomb.stat().st_size < 1 << 20
    with gzip.open(bomb) as f:  # the attack: it inflates beyond any MNIST file
        assert len(f.read(2 * data.LARGEST_FILE)) == 2 * data.LARGEST_FILE
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="holds more than the 47,040,016 bytes of the MNIST "
                                            "file it should be"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * data.LARGEST_FILE


def test_a_fifo_in_the_decode_cache_is_no_cache(tmp_path):
    """A FIFO in the place of a cache file hung every start (its open blocked: the record's,
    or the arrays' when their size matched and they were hashed); now it is no cache at once."""
    paths = data._cache_paths("0123456789abcdef")
    paths = {name: tmp_path / path.name for name, path in paths.items()}
    record = {"sources": {stem: md5 for stem, md5, _ in data.FILES.values()},
              "arrays": {name: {"bytes": 0, "sha256": "0" * 64, "stat": [0, 1, 2, 3]}
                         for name in ("images", "labels")}}
    results = []
    for fifo in ("record", "images"):
        for path in paths.values():
            path.unlink(missing_ok=True)
        paths["record"].write_text(json.dumps(record))
        paths["labels"].write_bytes(b"")
        paths[fifo].unlink(missing_ok=True)
        os.mkfifo(paths[fifo])
        thread = threading.Thread(target=lambda: results.append(data._load_cache(paths)),
                                  daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), f"blocked on a FIFO as the {fifo}"
    assert results == [None, None]
