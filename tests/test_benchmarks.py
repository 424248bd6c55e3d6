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
               "--work", str(tmp_path / "work"), "--loader-workers", "0")
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


@pytest.mark.slow
def test_gpu_floor_runs_its_eager_loop_on_the_cpu(tmp_path):
    run_script("gpu_floor.py", "--device", "cpu", "--epochs", "1", "--json",
               str(tmp_path / "f.json"))
    floor = json.loads((tmp_path / "f.json").read_text())
    assert len(floor["eager"]) == 1 and floor["eager"][0] > 0 and "graph" not in floor


def test_gpu_check_judges_the_issue_targets():
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_check import targets

    run = {"epoch_seconds": 0.01, "startup_seconds": 6.0}
    report = {"floors": {"graph": 0.006}, "machine": {"import_torch_seconds": 5.0},
              "runs": [{"name": "seq", **run},
                       {"name": "ddp-fork", "epoch_seconds": 0.014, "startup_seconds": 9.0},
                       {"name": "fsdp-fresh", "error": "timed out"}]}
    found = {t["target"]: (round(t["value"], 3), t["met"]) for t in targets(report)}
    assert found == {"seq epoch / CUDA-graph floor": (1.667, False),
                     "seq wall - train - import torch (s)": (1.0, True),
                     "ddp-fork epoch / seq epoch": (1.4, False),
                     "ddp-fork wall - train minus seq's (s)": (3.0, False)}


@pytest.mark.slow
def test_threads_times_one_and_two_threads_and_names_the_crossover():
    result = run_script("threads.py", "--widths", "16,512", "--batches", "64", "--rounds", "1",
                        "--min-seconds", "0.01")
    cases = [line for line in result.stdout.splitlines() if line.lstrip().startswith("W ")]
    assert len(cases) == 2 and all("1 thread" in c and "2 threads" in c for c in cases)
    assert "crossover:" in result.stdout and "load average" in result.stdout


@pytest.mark.slow
def test_busy_runs_seq_alone_and_beside_a_busy_process():
    result = run_script("busy.py", "--rounds", "1", "--", "--epochs", "1")
    assert "round 1 idle" in result.stdout and "round 1 busy" in result.stdout
    assert "threads 1" in result.stdout  # the default, in both
    assert "busy / idle: train" in result.stdout


@pytest.mark.slow
def test_precision_times_fp32_and_bf16_alternately():
    result = run_script("precision.py", "--widths", "16", "--batches", "1024", "--rounds", "1",
                        "--min-seconds", "0")
    assert "CPU bf16 features:" in result.stdout
    assert "bf16/fp32" in result.stdout and "bf16 layers/bf16" in result.stdout


@pytest.mark.slow
def test_noise_ab_alternates_the_tap_in_the_same_processes(tmp_path):
    run_script("noise_ab.py", "--launches", "2", "--epochs", "3", "--json",
               str(tmp_path / "n.json"))
    report = json.loads((tmp_path / "n.json").read_text())
    assert [launch["built_first"] for launch in report["launches"]] == ["off", "on"]
    for launch in report["launches"]:
        assert len(launch["seconds"]["off"]) == len(launch["seconds"]["on"]) == 3
    assert len(report["launch_medians"]) == 2 and 0.5 < report["ratio"] < 2


def test_tap_cold_times_every_read_cold_and_warm():
    result = run_script("tap_cold.py", "--rounds", "3")
    assert "(the tap's)" in result.stdout and "np.dot of a numpy view made once" in result.stdout
