#!/usr/bin/env bash
# Launch a pico recipe with torchrun; `section.key=value` arguments override its config:
#   ./torchrun.sh recipes/pretrain.py --config recipes/configs/demo.yaml training.max_steps=30
#   ./torchrun.sh python recipes/pretrain.py --config recipes/configs/demo.yaml  # a leading python is dropped
# Single node by default: every visible GPU, or 2 CPU processes without one (NPROC_PER_NODE overrides).
# Multi-node (c10d rendezvous): set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node, or run under
# SLURM (srun ./torchrun.sh ...), where SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID and the first host of
# SLURM_JOB_NODELIST fill them in. PYTHON (default python3) is the interpreter that has torch.
set -euo pipefail
# torchrun as a module of the interpreter, not a `torchrun` on PATH: works without an activated venv.
PYTHON=${PYTHON:-python3}

die() {
  echo "torchrun.sh: $*" >&2
  exit 2
}

# The first host of a SLURM hostlist, as `scontrol show hostnames | head -n 1` prints it, without scontrol
# (often missing in containers): node[01-03,07],gpu-a[1-2] -> node01; rack[2-3]-n[05,9] -> rack2-n05.
first_host() {
  local rest=$1 host="" group='^([^],[]*)\[([0-9]+)(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*\](.*)$'
  while [[ $rest =~ $group ]]; do # a prefix and a [ranges] group: keep the first number as written
    host+=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
    rest=${BASH_REMATCH[6]}
  done
  host+=${rest%%,*}
  [[ $host =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "cannot read a host from SLURM_JOB_NODELIST='$1'; set MASTER_ADDR to the host of SLURM_NODEID 0"
  echo "$host"
}

if [ "${1:-}" = python ] || [ "${1:-}" = python3 ]; then shift; fi
case "${1:-}" in
  "") sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2 && exit 2 ;;
  -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
esac

if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-pico}}
# One thread per process on CPU unless the caller chose otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The signals torchrun forwards to the workers: its defaults, and SIGUSR1/SIGUSR2, which SLURM sends ahead of
# a time limit (--signal); the workers checkpoint and exit on SIGTERM and SIGUSR1 (training.preempt_signals).
# torchrun then waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) before it SIGKILLs them.
SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  # Single node: a private rendezvous on a free port, so two runs on one machine never collide.
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" \
    --signals-to-handle "$SIGNALS" "$@"
fi
if [ -z "${MASTER_ADDR:-}" ]; then # never 127.0.0.1 here: each node would wait on itself
  [ -n "${SLURM_JOB_NODELIST:-}" ] ||
    die "NNODES=$NNODES needs MASTER_ADDR (a host every node reaches, that of NODE_RANK 0) or SLURM_JOB_NODELIST"
  MASTER_ADDR=$(first_host "$SLURM_JOB_NODELIST")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id "$RDZV_ID" --signals-to-handle "$SIGNALS" "$@"
