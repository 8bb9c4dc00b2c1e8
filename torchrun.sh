#!/usr/bin/env bash
# Launch a pico recipe with torchrun (c10d rendezvous).
#   ./torchrun.sh recipes/pretrain.py --config recipes/configs/demo.yaml [section.key=value ...]
# Single node by default: every visible GPU, or 2 CPU processes without one (NPROC_PER_NODE overrides).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node, or run under SLURM
# (srun ./torchrun.sh ...), where SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID and the first host of
# SLURM_JOB_NODELIST fill them in. PYTHON (default python3) is the interpreter that has torch.
set -euo pipefail
# torchrun as a module of the interpreter, not a `torchrun` on PATH: works without an activated venv.
PYTHON=${PYTHON:-python3}

if [ $# -eq 0 ]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
ADDR_GIVEN=${MASTER_ADDR:-}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-pico}}
# One thread per process on CPU unless the caller chose otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$NNODES" -eq 1 ] && [ -z "$ADDR_GIVEN" ]; then
  # Single node: a private rendezvous on a free port, so two runs on one machine never collide.
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id "$RDZV_ID" "$@"
