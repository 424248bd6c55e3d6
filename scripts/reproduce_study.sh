#!/usr/bin/env bash
# Reproduce the seed study (cases a-c) and go beyond it (d, e); see docs/STUDY.md.
#
#   scripts/reproduce_study.sh [--quick] [--out DIR]      (DIR defaults to runs/study)
#
# --quick: 1 epoch per run and nproc 2 instead of 1,2,4,6,8 (8 becomes 2): a smoke test of
# the whole pipeline in under a minute, not a result. Runs are replaced (--force) when rerun.
# Set DPTRAIN to choose the command (default: python -m dptrain).
set -euo pipefail
cd "$(dirname "$0")/.."

out=runs/study
quick=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=true; shift ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--quick] [--out DIR]" >&2; exit 2 ;;
    esac
done

read -r -a dptrain <<< "${DPTRAIN:-python -m dptrain}"
nprocs=1,2,4,6,8
big=8          # the seed study's process count
extra=(--force)
if $quick; then
    nprocs=2
    big=2
    extra+=(--epochs 1)
    echo "quick: 1 epoch per run, nproc 2 (+ seq): a smoke test, not a result"
fi
cfg=configs/study
started=$SECONDS
step() { echo; echo "=== $* ($((SECONDS - started)) s)"; }

step "a. seed Fig. 6: seq at batch 1024 vs ddp x$big full batch, lr 0.01, 25 epochs"
"${dptrain[@]}" seq --config $cfg/a-seq.toml --out "$out/a/seq" "${extra[@]}"
"${dptrain[@]}" ddp --config $cfg/a-full-batch.toml --nproc $big --out "$out/a/ddp-full-batch" "${extra[@]}"
"${dptrain[@]}" plot "$out/a/seq" "$out/a/ddp-full-batch" --out "$out/a/loss.png"

step "b. seed Fig. 7: ddp x$big full batch with the seed's lr rule, 100 epochs"
"${dptrain[@]}" ddp --config $cfg/b-seed-rule.toml --nproc $big --out "$out/b/ddp-seed-rule" "${extra[@]}"
"${dptrain[@]}" plot "$out/a/seq" "$out/a/ddp-full-batch" "$out/b/ddp-seed-rule" --out "$out/b/loss.png"

step "c. seed Figs. 8-9: full-batch sweep, seed's lr rule, nproc $nprocs"
"${dptrain[@]}" sweep --config $cfg/c-seed-sweep.toml --nproc $nprocs --out "$out/c" "${extra[@]}"

step "d. constant global batch 1024: ddp sweep over nproc $nprocs"
"${dptrain[@]}" sweep --config $cfg/d-constant-batch.toml --nproc $nprocs --out "$out/d" "${extra[@]}"

step "e. full batch, linear lr rule with warmup, nproc $nprocs"
"${dptrain[@]}" sweep --config $cfg/e-linear-warmup.toml --nproc $nprocs --out "$out/e" "${extra[@]}"
"${dptrain[@]}" plot "$out/c/ddp-$big" "$out/e/ddp-$big" --out "$out/e/seed_vs_linear.png"

step "figures"
for sweep in c d e; do
    "${dptrain[@]}" report "$out/$sweep"
done
echo "study done in $((SECONDS - started)) s; results in $out"
