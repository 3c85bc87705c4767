#!/usr/bin/env bash
# One node: every GPU (or, on a CPU machine, NPROC processes) of this machine.
#   bash examples/launch/torchrun_single_node.sh configs/llama3_8b_paper.yaml [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [section.key=value ...]}
shift
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec torchrun --standalone --nproc_per_node "$NPROC" -m adadpo_megatron --config "$CONFIG" "$@"
