"""The benchmark scripts still run end to end (one short round each); their numbers are not
judged here: timings belong in benchmarks, not in tests."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_bench_reports_every_target(tmp_path):
    run_script("bench.py", "--repeats", "1", "--epochs", "1", "--json", str(tmp_path / "b.json"),
               "--work", str(tmp_path / "work"))
    report = json.loads((tmp_path / "b.json").read_text())
    assert len(report["targets"]) == 7
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in report["targets"])
    assert report["machine"]["cores"] >= 1 and report["machine"]["threads_per_process"] == 1
    assert set(report["samples"]) == {"floor", "import", "seq", "ddp", "ddp_gloo", "fsdp",
                                      "tutorial"}
    assert report["medians"]["seq_test_accuracy"] == report["medians"]["ddp_test_accuracy"]


@pytest.mark.slow
def test_scale_reports_speedup_against_seq(tmp_path):
    result = run_script("scale.py", "--nproc", "2", "--repeats", "1", "--epochs", "1", "--json",
                        str(tmp_path / "s.json"))
    report = json.loads((tmp_path / "s.json").read_text())
    rows = {row["case"]: row for row in report["rows"]}
    assert set(rows) == {"seq", "ddp-2", "ddp-2 gloo"} and not report["failed"]
    assert rows["seq"]["speedup"] == 1.0
    assert rows["ddp-2"]["efficiency"] == pytest.approx(rows["ddp-2"]["speedup"] / 2)
    assert "ddp-2 gloo" in result.stdout


@pytest.mark.slow
def test_profile_loop_splits_a_step_into_phases():
    result = run_script("profile_loop.py", "--epochs", "1")
    for phase in ("batch", "forward and loss", "backward", "optimizer", "total", "GEMM floor"):
        assert phase in result.stdout


@pytest.mark.slow
def test_step_ops_times_every_operation_of_a_step():
    result = run_script("step_ops.py", "--epochs", "1")
    for name in ("gather pixels", "widen pixels", "layer 1 forward", "Adam step", "sum"):
        assert name in result.stdout
