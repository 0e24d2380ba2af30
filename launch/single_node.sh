#!/usr/bin/env bash
# The main job on one machine: every layout the world size allows, one table, non-zero on failure.
# CPU/gloo by default; on a GPU machine it uses NCCL and one GPU per rank.
#   bash launch/single_node.sh             # one rank per GPU when nvidia-smi finds GPUs, else 4 CPU ranks
#   NPROC=8 bash launch/single_node.sh     # any other count (on GPUs: at most the GPU count)
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  GPUS=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  NPROC=$(( GPUS > 0 ? GPUS : 4 ))
fi
echo "launch/single_node.sh: $NPROC ranks" >&2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node="$NPROC" -m distclip.verify "$@"
