"""benchmarks/cost_model.py's extension for the knobs (study section 5), on section 2's fit and
gradient sums as committed (docs/results/study-f) and a made-up compress_cost.json: the model's
arithmetic, not this machine's numbers."""

import importlib.util
import json

import pytest

from conftest import REPO

RESULTS = REPO / "docs" / "results" / "study-f"


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model",
                                                  REPO / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compress_cost(overhead_per_param: float) -> dict:
    """compress_cost.json's shape: fp16 and PowerSGD costing `overhead_per_param` s each."""
    rows = []
    for params, ratio in ((13002, 7.4), (1863690, 157.0), (20037642, 471.0)):
        methods = {"sum": {"seconds": 1e-4, "ratio": 1.0, "overhead_seconds": 0.0}}
        for name, r in (("fp16", 2.0), ("bf16", 2.0), ("powersgd:2", ratio)):
            methods[name] = {"seconds": 1e-4 + overhead_per_param * params, "ratio": r,
                             "overhead_seconds": overhead_per_param * params}
        rows.append({"params": params, "methods": methods, "average_seconds": 1e-9 * params})
    return {"rows": rows}


def test_the_knobs_pay_where_the_link_is_slow_and_compressing_is_cheap(cost_model):
    coef = list(json.loads((RESULTS / "cost_model.json").read_text())["coefficients"].values())
    grad_sync = json.loads((RESULTS / "grad_sync.json").read_text())
    cheap = cost_model.knob_report(coef, 2, 1024, [], grad_sync, compress_cost(1e-13))
    pays = cheap["pays_from"]
    # fp16 through gloo moves half the bytes at 4x the shared-memory sum's price per byte:
    # never cheaper than the plain shared-memory sum, however cheap the cast...
    assert pays["this node (knob on gloo, plain ddp on shared memory)"]["fp16"]["params"] is None
    # ...where the plain sum runs on the same slow link, it pays at every width.
    assert pays["10 Gb/s Ethernet"]["fp16"]["params"] == pytest.approx(1e4)
    # PowerSGD pays three latencies for its tiny messages: only from some width on.
    ethernet = pays["10 Gb/s Ethernet"]["powersgd:2"]["params"]
    assert ethernet and 1e4 < ethernet < 1e7
    assert cost_model.mlp_params(round(pays["10 Gb/s Ethernet"]["powersgd:2"]["hidden"])) \
        == pytest.approx(ethernet, rel=0.01)
    dear = cost_model.knob_report(coef, 2, 1024, [], grad_sync, compress_cost(1e-8))
    assert dear["pays_from"]["10 Gb/s Ethernet"]["fp16"]["params"] is None  # 10 ns a parameter
    assert set(cheap["pays_from"]) == {"this node (knob on gloo, plain ddp on shared memory)",
                                       "this node, both on shared memory (not offered)",
                                       "10 Gb/s Ethernet", "100 Gb/s Ethernet"}


def test_the_plain_sum_on_the_shared_memory_link_is_the_fit_itself(cost_model):
    """Replacing the fitted sum by the same shared-memory sum gives section 2's model back,
    up to how the shared-memory sum's own time splits into latency and bytes."""
    fit = json.loads((RESULTS / "cost_model.json").read_text())
    coef = list(fit["coefficients"].values())
    grad_sync = json.loads((RESULTS / "grad_sync.json").read_text())
    shm = cost_model.sum_link(grad_sync, "shm")
    for point in fit["points"]:
        if point["mode"] == "ddp" and point["nproc"] == 2:
            knob = cost_model.knob_step_seconds(coef, "plain", point["params"], 1024, 2, 2, shm,
                                                shm, {}, {})
            assert knob == pytest.approx(point["model_seconds"], rel=0.02)


@pytest.mark.slow
def test_compress_cost_times_each_hook_and_its_ratio(tmp_path):
    """benchmarks/compress_cost.py end to end, one short round: every method of dptrain's
    hooks timed on one rank, with the bytes each would send."""
    import subprocess
    import sys

    out = tmp_path / "compress_cost.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compress_cost.py"),
                             "--widths", "16,16", "--repeats", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["params"] == 13002 and row["average_seconds"] > 0
    methods = row["methods"]
    assert set(methods) == {"sum", "fp16", "bf16", "powersgd:1", "powersgd:2", "powersgd:4"}
    assert methods["fp16"]["ratio"] == methods["bf16"]["ratio"] == 2.0
    # rank 2: each weight (n x m) as factors of (n + m) x 2 elements, the biases whole
    assert methods["powersgd:2"]["wire_bytes"] == 4 * ((16 + 784) * 2 + (16 + 16) * 2
                                                       + (10 + 16) * 2 + 16 + 16 + 10)
    assert all(m["seconds"] > 0 for m in methods.values())
