#!/usr/bin/env bash
# Reproduce the seed study (cases a-c), go beyond it (d, e), and answer the study's part 2:
# when data parallelism pays (f, section 2), what FSDP saves (f, section 3), how to scale the
# lr with the batch (g, section 4), what each knob buys (h, section 5), and check
# `dptrain plan` against real runs (p, section 6). See docs/STUDY.md.
#
#   scripts/reproduce_study.sh [--quick] [--out DIR] [--only CASES]   (DIR defaults to runs/study)
#
# --quick: 1 epoch per run, nproc 2 instead of 1,2,4,6,8 (8 becomes 2), and small grids: a smoke
# test of the whole pipeline (but p) in about a minute, not a result. --only: a comma-separated
# subset of a,b,c,d,e,f,g,h,p (b and e also draw on a and c's runs; h's cost model on f's). Runs
# are replaced (--force) when rerun, except p's, which continue where they stopped (their
# timings: p's quiet-machine part).
# Set DPTRAIN to choose the command (default: python -m dptrain), PYTHON for the benchmarks.
set -euo pipefail

out=runs/study
quick=false
only=a,b,c,d,e,f,g,h,p
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=true; shift ;;
        --out) out="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        *) echo "usage: $0 [--quick] [--out DIR] [--only a,b,c,d,e,f,g,h,p]" >&2; exit 2 ;;
    esac
done
# A relative --out means the caller's folder, not the repository's.
[[ "$out" = /* ]] || out="$PWD/$out"
cd "$(dirname "$0")/.."

read -r -a dptrain <<< "${DPTRAIN:-python -m dptrain}"
python=${PYTHON:-python}
nprocs=1,2,4,6,8
big=8          # the seed study's process count
ep25=25        # the seed study's epochs (cases a, d)
ep100=100      # its longer runs (cases b, c, e)
# Sections 2 and 3: widths x nproc (seq is every cell's n = 1); section 4: the lr rules.
widths=16,16:256,256:1024,1024:4096,4096
grid_nprocs=2,4
rules=(--vary lr_scaling=none,linear,sqrt --vary warmup_epochs=0,5)
batches=256,512,1024,2048,4096,8192,16384,42000
sync_args=()
optimizers=(adam sgd)
# Section 5: each knob against seq fp32, per width (hidden:epochs:nproc), and the seed band.
knob_widths=(16,16:25:2,4 1024,1024:5:2)
seeds=0,1,2,3,4
compressions=none,fp16,bf16,powersgd
local_sgd=4,16
more_knobs=true
cost_args=()
plan_settings=adam-16,sgd-16,adam-1024,sgd-1024   # section 6: optimizer-width (not --quick)
extra=(--force)
if $quick; then
    nprocs=2
    big=2
    ep25=1
    ep100=1
    widths="[16,16]"   # one list value: Hydra's brackets
    grid_nprocs=2
    rules=(--vary lr_scaling=sqrt)
    batches=1024,4096
    sync_args=(--nproc 2 --sizes 13002 --repeats 1)
    optimizers=(adam)
    knob_widths=(16,16:1:2)
    seeds=0,1
    compressions=none  # the other knobs go through the same sweep, matrix and model code
    more_knobs=false
    cost_args=(--widths 16,16:64,64 --repeats 2)
    extra+=(--epochs 1)
    echo "quick: 1 epoch per run, nproc 2 (+ seq), small grids: a smoke test, not a result"
fi
cfg=configs/study
started=$SECONDS
step() { echo; echo "=== $* ($((SECONDS - started)) s)"; }
wanted() { [[ ",$only," == *",$1,"* ]]; }
epochs() { if [[ $1 == 1 ]]; then echo "1 epoch"; else echo "$1 epochs"; fi; }

if wanted a; then
    step "a. seed Fig. 6: seq at batch 1024 vs ddp x$big full batch, lr 0.01, $(epochs $ep25)"
    "${dptrain[@]}" seq --config $cfg/a-seq.toml --out "$out/a/seq" "${extra[@]}"
    "${dptrain[@]}" ddp --config $cfg/a-full-batch.toml --nproc $big --out "$out/a/ddp-full-batch" "${extra[@]}"
    "${dptrain[@]}" plot "$out/a/seq" "$out/a/ddp-full-batch" --out "$out/a/loss.png"
fi
if wanted b; then
    step "b. seed Fig. 7: ddp x$big full batch with the seed's lr rule, $(epochs $ep100)"
    "${dptrain[@]}" ddp --config $cfg/b-seed-rule.toml --nproc $big --out "$out/b/ddp-seed-rule" "${extra[@]}"
    "${dptrain[@]}" plot "$out/a/seq" "$out/a/ddp-full-batch" "$out/b/ddp-seed-rule" --out "$out/b/loss.png"
fi
if wanted c; then
    step "c. seed Figs. 8-9: full-batch sweep, seed's lr rule, nproc $nprocs, $(epochs $ep100)"
    "${dptrain[@]}" sweep --config $cfg/c-seed-sweep.toml --nproc $nprocs --out "$out/c" "${extra[@]}"
    "${dptrain[@]}" report "$out/c"
fi
if wanted d; then
    step "d. constant global batch 1024: ddp sweep over nproc $nprocs, $(epochs $ep25)"
    "${dptrain[@]}" sweep --config $cfg/d-constant-batch.toml --nproc $nprocs --out "$out/d" "${extra[@]}"
    "${dptrain[@]}" report "$out/d"
fi
if wanted e; then
    step "e. full batch, linear lr rule with warmup, nproc $nprocs, $(epochs $ep100)"
    "${dptrain[@]}" sweep --config $cfg/e-linear-warmup.toml --nproc $nprocs --out "$out/e" "${extra[@]}"
    "${dptrain[@]}" plot "$out/c/ddp-$big" "$out/e/ddp-$big" --out "$out/e/seed_vs_linear.png"
    "${dptrain[@]}" report "$out/e"
fi
if wanted f; then
    step "f. sections 2-3: ddp and fsdp x $grid_nprocs against seq, hidden $widths"
    "${dptrain[@]}" sweep --config $cfg/f-width-grid.toml --mode ddp,fsdp --nproc $grid_nprocs \
        --vary "hidden=$widths" --out "$out/f" --force
    "${dptrain[@]}" report "$out/f"
    $python benchmarks/cost_model.py "$out/f"
    step "f. section 2: one gradient sum, gloo against shared memory"
    $python benchmarks/grad_sync.py "${sync_args[@]}" --json "$out/f/grad_sync.json" \
        | tee "$out/f/grad_sync.txt"
fi
if wanted g; then
    for optimizer in "${optimizers[@]}"; do
        step "g. section 4: $optimizer, lr rules x global batch $batches (seq)"
        "${dptrain[@]}" sweep --config $cfg/g-lr-$optimizer.toml --mode seq "${rules[@]}" \
            --vary batch_size=$batches --out "$out/g-$optimizer" "${extra[@]}"
        "${dptrain[@]}" report "$out/g-$optimizer"
    done
    demo=(--nproc 2,4 --vary lr_scaling=none,linear,sqrt,seed --vary batch_size=4096,42000)
    $quick && demo=(--nproc 2 --vary lr_scaling=seed --vary batch_size=4096)
    step "g. section 4: the rules at seq and ddp ${demo[1]}: nproc does not enter (but for seed)"
    "${dptrain[@]}" sweep --config $cfg/g-lr-adam.toml --mode ddp "${demo[@]}" \
        --out "$out/g-nproc" "${extra[@]}"
    "${dptrain[@]}" report "$out/g-nproc"
fi
if wanted h; then
    mkdir -p "$out/h"
    knob_sweeps=()
    more=""
    $more_knobs && more=", --local-sgd $local_sgd, --zero, --accumulate 1,4 x --precision fp32,bf16"
    for width in "${knob_widths[@]}"; do
        IFS=: read -r hidden ep knob_nprocs <<< "$width"
        dir="$out/h/${hidden//,/-}"
        knob=("${dptrain[@]}" sweep --config $cfg/h-knobs.toml --hidden "$hidden" --epochs "$ep" --force)
        step "h. section 5: hidden $hidden, $(epochs $ep): seq at seeds $seeds (the reference and its band)"
        "${knob[@]}" --mode seq --vary seed=$seeds --out "$dir/band"
        step "h. ddp x $knob_nprocs: --grad-compress $compressions$more"
        # --no-seq: the band sweep holds every cell's seq fp32 reference (seed 0)
        "${knob[@]}" --mode ddp --nproc "$knob_nprocs" --no-seq --vary grad_compress=$compressions --out "$dir/compress"
        knob_sweeps+=("$dir/band" "$dir/compress")
        if $more_knobs; then
            "${knob[@]}" --mode ddp --nproc "$knob_nprocs" --no-seq --vary local_sgd=$local_sgd --out "$dir/local-sgd"
            "${knob[@]}" --mode ddp --nproc "$knob_nprocs" --no-seq --vary zero=true --out "$dir/zero"
            # every mode's knobs: each cell's seq runs them too (a seq row of the matrix)
            "${knob[@]}" --mode ddp --nproc "$knob_nprocs" --vary accumulate=1,4 \
                --vary precision=fp32,bf16 --out "$dir/accumulate-precision"
            knob_sweeps+=("$dir/local-sgd" "$dir/zero" "$dir/accumulate-precision")
        fi
    done
    step "h. the matrix: every knob against seq fp32"
    "${dptrain[@]}" matrix "${knob_sweeps[@]}" --out "$out/h"
    step "h. the cost model: compression's own cost, then the model extended with the knobs"
    $python benchmarks/compress_cost.py "${cost_args[@]}" --json "$out/h/compress_cost.json" \
        | tee "$out/h/compress_cost.txt"
    if [[ -f "$out/f/sweep.json" && -f "$out/f/grad_sync.json" ]]; then
        $python benchmarks/cost_model.py "$out/f" --knobs "${knob_sweeps[@]}" \
            --grad-sync "$out/f/grad_sync.json" --compress-cost "$out/h/compress_cost.json" \
            --out "$out/h" | tee "$out/h/knob_model.txt"
    else
        echo "h: no $out/f (case f) to fit the base cost model on; run --only f,h"
    fi
fi
# --quick skips p (its runs are long by nature; tests/test_plan.py runs a plan end to end).
if wanted p && ! $quick; then
    step "p. section 6: plan's predicted updates against real runs, $plan_settings"
    $python benchmarks/plan_check.py updates --out "$out/p" --settings "$plan_settings"
    step "p. section 6: timings (seconds per update, time to target, the plan itself)"
    $python benchmarks/plan_check.py times --out "$out/p" --settings "$plan_settings"
    $python benchmarks/plan_check.py compare --out "$out/p"
fi
echo "study done in $((SECONDS - started)) s; results in $out"
