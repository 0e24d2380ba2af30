#!/usr/bin/env bash
# The main job across nodes (run the same command on every node):
#   NNODES=2 NPROC=8 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/multi_node.sh
# Uses torchrun's c10d rendezvous; the world must be a multiple of 2 for the pipeline layouts.
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-distclip-verify}" \
  -m distclip.verify "$@"
