#!/usr/bin/env bash
# The demo, from a fresh clone with only Python 3.12: a tiny GPT learns to prefer correctly
# reversed words. Sets up .venv (once), then on two CPU processes (2-way data parallel):
#   1. supervised warm-up on the chosen responses   (configs/demo_sft.yaml)
#   2. AdaDPO from that checkpoint, which is also the reference   (configs/demo_adadpo.yaml)
#   3. plots (runs/demo/adadpo/plots/*.png) and a summary table (runs/demo/adadpo/summary.md)
# It fails if the held-out reward accuracy ends below 0.75. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=examples/python312.sh
. examples/python312.sh

[ -x .venv/bin/pip ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q -e .   # quick when already installed; picks up new dependencies
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
# glibc keeps the memory it frees (docs/CPU.md, "The allocator"): faster CPU steps
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 MALLOC_TOP_PAD_=1073741824

# The data set is shipped; this regenerates it and checks it is the same.
python examples/make_preference_data.py --out runs/demo-data.jsonl
cmp -s runs/demo-data.jsonl examples/data/reverse_pairs.jsonl ||
  { echo "examples/data/reverse_pairs.jsonl differs from its generator's output" >&2; exit 1; }

rm -rf runs/demo
torchrun --standalone --nproc_per_node 2 -m adadpo_megatron --config configs/demo_sft.yaml
torchrun --standalone --nproc_per_node 2 -m adadpo_megatron --config configs/demo_adadpo.yaml
adadpo-plot runs/demo/adadpo
adadpo-summary runs/demo/adadpo --min-eval-accuracy 0.75
