#!/usr/bin/env bash
# Many nodes with torchrun's c10d rendezvous: run the same command on every node.
#   NNODES=8 RDZV_HOST=node001 bash examples/launch/torchrun_multi_node.sh \
#       configs/llama3_70b_h100_fp8.yaml [section.key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [section.key=value ...]}
shift
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST, a host every node can reach}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-adadpo}" -m adadpo_megatron --config "$CONFIG" "$@"
