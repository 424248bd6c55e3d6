#!/usr/bin/env bash
# The GPU machine's check, in one short run: the CUDA path end to end, then the harness.
#
#   DPTRAIN_DATA_DIR=... benchmarks/gpu_check.sh OUT_DIR
#
# 1. seq, ddp --nproc 1 (nccl) and fsdp --nproc 1 with --device cuda, 3 epochs each, their
#    final parameters compared with one another and with a CPU seq run (parity);
# 2. a user error on that path (more CUDA ranks than GPUs) must be one line and exit 2;
# 3. benchmarks/scale.py: seq on 1 CPU thread, ddp over 1..16 CPU ranks, and the CUDA runs;
# 4. benchmarks/bench.py: the 2-process harness, for comparison with the 2-core machine.
# Each step has its own time limit, so one hang costs only its own part.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DPTRAIN_CACHE_DIR=${DPTRAIN_CACHE_DIR:-/tmp/dptrain-cache}
py=${PYTHON:-python3}
runs=$(mktemp -d)

step() { echo; echo "== $* ($(date +%T))"; }

step machine
nvidia-smi -L
nproc
$py -c 'import sys, torch, typer, numpy; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "typer", typer.__version__, "numpy", numpy.__version__)'

step "CUDA path, 3 epochs"
for mode in seq ddp fsdp; do
    launch=(); [ $mode = seq ] || launch=(--nproc 1)
    timeout 120 $py -m dptrain $mode "${launch[@]}" --device cuda --epochs 3 \
        --out "$runs/cuda-$mode" 2>&1 | tail -4
    echo "exit ${PIPESTATUS[0]}"
done
timeout 60 $py -m dptrain seq --device cpu --threads 1 --epochs 3 --out "$runs/cpu-seq" | tail -1
$py - "$runs" <<'EOF'
import json, sys, torch
from pathlib import Path
runs = Path(sys.argv[1])
states = {}
for name in ("cuda-seq", "cuda-ddp", "cuda-fsdp", "cpu-seq"):
    try:
        states[name] = torch.load(runs / name / "model.pt", weights_only=True)
        summary = json.loads((runs / name / "summary.json").read_text())
        print(f"{name}: test accuracy {summary['test_accuracy']:.5f}, train {summary['train_seconds']:.2f} s, "
              f"wall {summary['wall_seconds']:.2f} s, memory {summary['memory']}")
    except Exception as e:
        print(f"{name}: no result ({e})")
base = states.get("cuda-seq")
for name, state in states.items():
    if base is not None and name != "cuda-seq":
        diff = max((state[k] - base[k]).abs().max().item() for k in base)
        print(f"max |{name} - cuda-seq| = {diff:.3g}")
EOF

step "user error: 2 CUDA ranks on one GPU"
timeout 60 $py -m dptrain ddp --nproc 2 --device cuda --epochs 1 --out "$runs/too-many"
echo "exit $?"

step "scale.py"
(cd "$here/benchmarks" && timeout 300 $py scale.py --cuda --nproc 1,2,4,8,16 --repeats 3 \
    --json "$out/scale.json")

step "bench.py"
(cd "$here/benchmarks" && timeout 150 $py bench.py --repeats 2 --json "$out/bench.json")

step done
rm -rf "$runs"
