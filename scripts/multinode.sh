#!/usr/bin/env bash
# Multi-node dptrain with torchrun. Start this same script on every node of the job.
# (python -m dptrain.distributed.launch is torchrun with the CLI launcher's additions: its
# logs in a scratch folder removed at the end, and a 5 s grace for a stopped worker.)
#
#   NNODES=2 NPROC=4 RDZV=head-node:29400 JOB_ID=mnist-1 scripts/multinode.sh --mode ddp --epochs 25
#
# NNODES   nodes in the job (every node must say the same)
# NPROC    worker processes on this node: one per GPU, or a share of the cores for gloo on CPUs
# RDZV     HOST:PORT of the rendezvous: any node's address (usually the first) and a free port
# JOB_ID   one id per job, the same on every node, so that two jobs never join each other
# MAX_RESTARTS  optional (default 0): torchrun restarts all workers after a failure this often;
#          they resume from the newest checkpoint in --out (which must then be shared storage)
#
# Every node must resolve the same run: a node given another --lr, --seed, batch, ... is
# refused at start in one line naming the keys and the nodes (data_dir and threads may differ).
#
# Everything after the script name goes to the worker: --mode seq|ddp|fsdp and the training
# flags of `dptrain ddp --help` (--config, --epochs, --batch-size, --lr, --out, ...).
# Ranks are assigned at the rendezvous; global rank 0 writes the run folder, so give --out a
# path on a file system that node can write (shared storage if you want to read it elsewhere).
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${NPROC:?set NPROC, the worker processes per node}"
: "${RDZV:?set RDZV=HOST:PORT of the rendezvous}"
: "${JOB_ID:?set JOB_ID, the same on every node}"

# A rendezvous store per attempt: restarted workers must not read the last attempt's addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec python -m dptrain.distributed.launch \
    --nnodes="$NNODES" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV" \
    --rdzv-id="$JOB_ID" \
    -m dptrain.worker "$@"
