"""The suite itself: it runs in a folder of its own and leaves the checkout as it found it
(conftest's session fixture compares the checkout's listing before and after)."""

import os
from pathlib import Path

from conftest import REPO, changed_paths, checkout_listing


def test_the_tests_run_outside_the_checkout():
    here = Path.cwd().resolve()
    assert not here.is_relative_to(REPO.resolve()), here
    # Processes the tests start import the tree under test from there.
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_the_checkout_check_sees_added_and_removed_paths_but_not_caches(tmp_path):
    (tmp_path / "dptrain").mkdir()
    (tmp_path / "dptrain" / "kept.py").write_text("")
    (tmp_path / "gone.txt").write_text("")
    before = checkout_listing(tmp_path)
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "runs" / "ddp-20250101-000000").mkdir(parents=True)
    (tmp_path / "runs" / "ddp-20250101-000000" / ".dptrain.lock").write_text("")
    (tmp_path / "dptrain" / "__pycache__").mkdir()
    (tmp_path / "dptrain" / "__pycache__" / "kept.cpython-311.pyc").write_text("")
    changes = changed_paths(before, checkout_listing(tmp_path))
    assert changes == ("added runs, runs/ddp-20250101-000000, "
                       "runs/ddp-20250101-000000/.dptrain.lock; removed gone.txt")
    assert changed_paths(before, before) == ""
