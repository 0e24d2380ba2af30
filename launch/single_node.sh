#!/usr/bin/env bash
# The main job on one machine: every layout the world size allows, one table, non-zero on failure.
# CPU/gloo by default; on a GPU machine it uses NCCL and one GPU per rank.
#   NPROC=4 bash launch/single_node.sh            # CPU or all GPUs of this node
set -euo pipefail
NPROC=${NPROC:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node="$NPROC" -m distclip.verify "$@"
