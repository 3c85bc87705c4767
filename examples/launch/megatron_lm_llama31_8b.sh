#!/usr/bin/env bash
# AdaDPO in a Megatron-LM job: Llama-3.1-8B-Instruct on UltraFeedback, 2 nodes x 8 H100,
# TP 2 x DP 8 with sequence parallelism and the distributed optimizer, bf16. Run the same
# command on every node (torchrun's c10d rendezvous):
#   NNODES=2 RDZV_HOST=node001 bash examples/launch/megatron_lm_llama31_8b.sh [more flags]
# First, once: the reference's log-probs (configs/megatron_lm_llama31_8b_adadpo.yaml says how).
# Everything but the last block is what a Megatron-LM Llama-3.1-8B fine-tuning job already
# passes; docs/MEGATRON_LM.md explains the plug-in's flags and what they change.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST, a host every node can reach}"
BASE=${BASE:-/ckpt/llama31-8b-instruct-mcore}      # torch_dist, converted from Hugging Face
SAVE=${SAVE:-/ckpt/llama31-8b-adadpo}
CONFIG=${CONFIG:-configs/megatron_lm_llama31_8b_adadpo.yaml}
export CUDA_DEVICE_MAX_CONNECTIONS=1                 # Megatron-LM's requirement under TP

MODEL=(  # Llama-3.1-8B
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
    --group-query-attention --num-query-groups 8 --normalization RMSNorm --norm-epsilon 1e-5
    --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --position-embedding-type rope --rotary-base 500000 --use-rope-scaling
    --rope-scaling-factor 8.0 --attention-dropout 0 --hidden-dropout 0
    --seq-length 2048 --max-position-embeddings 131072
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Llama-3.1-8B-Instruct
    --make-vocab-size-divisible-by 128
)
PARALLEL=(
    --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
    --overlap-grad-reduce --overlap-param-gather --bf16
)
TRAINING=(  # the paper's setting: 128 pairs a step, one epoch, lr 5e-7 cosine, 10% warm-up
    --micro-batch-size 1 --global-batch-size 128 --train-iters 477 --seed 1234
    --lr 5e-7 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1
    --weight-decay 0 --adam-beta1 0.9 --adam-beta2 0.999 --clip-grad 1.0
    --recompute-granularity selective
)
CHECKPOINTS=(  # the first start fine-tunes BASE; every restart resumes SAVE
    --pretrained-checkpoint "$BASE" --load "$SAVE" --save "$SAVE" --save-interval 100
    --ckpt-format torch_dist --exit-signal-handler
)
LOGGING=(
    --log-interval 1 --eval-interval 50 --eval-iters 4
    --tensorboard-dir "$SAVE/tensorboard" ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT"}
)
ADADPO=(  # what the plug-in adds: per-pair loss division and its run config
    --calculate-per-token-loss --adadpo-config "$CONFIG"
)
exec torchrun --nnodes "$NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-adadpo-megatron-lm}" examples/megatron_lm_pretrain.py \
    "${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${CHECKPOINTS[@]}" "${LOGGING[@]}" \
    "${ADADPO[@]}" "$@"
