"""Analytical GPU memory per rank of a recipe (an estimate, not a measurement).

    python benchmarks/memory_estimate.py configs/llama3_70b_h100_fp8.yaml 64
    # without the model's directory on this machine, its preset stands in for model.hf:
    python benchmarks/memory_estimate.py configs/llama3_70b_h100_fp8.yaml 64 \
        model.hf=null model.preset=llama3-70b

Counts, for the most loaded pipeline rank (first or last stage):
    parameters    exact from the architecture (embedding, QKV with query groups, output
                  projection, gated MLP, norms, untied output layer), split by TP and PP
    weights       bf16, 2 bytes/param (4 in float32)
    gradients     float32 grad buffer (grad_reduce_in_fp32), 4 bytes/param
    optimizer     float32 main params + Adam's two moments, 12 bytes/param, divided by DP
                  with the distributed optimizer
    fp8 copies    Transformer Engine's FP8 weight and transpose caches, 2 bytes per linear
                  parameter, when model.fp8 is set
    reference     resident reference weights, 2 bytes/param (none when precomputed)
    activations   Korthikanti et al. 2022 (arXiv 2205.05198), sequence parallel + selective
                  recompute: 34 s b h / t bytes per layer and micro-batch (b = 2 sequences
                  per pair), times the layers of all in-flight micro-batches of the first
                  stage (PP of them in 1F1B), times Megatron-LM's interleaving penalty
                  1 + (PP - 1) / (PP * VPP)
    log-probs     this project's op on the last stage: bf16 logits and their gradient for one
                  micro-batch, plus one float32 chunk
It leaves out the CUDA context, NCCL buffers and allocator fragmentation (a few GiB).
"""

from __future__ import annotations

import sys

from adadpo_megatron.mcore.model import padded_vocab_size
from adadpo_megatron.training.run_config import load_run_config

GIB = 2**30


def estimate(config) -> dict:
    t, p = config.model.transformer, config.parallel
    h, layers, heads = t["hidden_size"], t["num_layers"], t["num_attention_heads"]
    groups = t.get("num_query_groups") or heads
    ffn = t.get("ffn_hidden_size") or 4 * h
    kv = t.get("kv_channels") or h // heads
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    vocab = config.model.vocab_size or padded_vocab_size(
        128256 if "llama3" in (config.model.preset or "") else 32000, config.model, tp)
    glu = 2 if t.get("gated_linear_unit") else 1
    linear_per_layer = h * (heads * kv + 2 * groups * kv) + heads * kv * h + h * glu * ffn + \
        ffn * h
    per_layer = linear_per_layer + 2 * h
    embedding = vocab * h
    # the first stage holds the input embedding, the last the output layer (and final norm)
    rank_params = per_layer * layers / pp / tp + embedding / tp * (2 if pp == 1 else 1) + \
        (h if pp == 1 else 0)
    linear_params = linear_per_layer * layers / pp / tp
    return {"vocab": vocab, "total_params": per_layer * layers + 2 * embedding + h,
            "rank_params": rank_params, "linear_params": linear_params,
            "h": h, "layers": layers, "tp": tp, "pp": pp, "vpp": vpp}


def report(config, world_size: int) -> str:
    e = estimate(config)
    dp = config.check_layout(world_size)
    bf16 = config.train.dtype == "bfloat16"
    distributed = config.optimizer.megatron.get("use_distributed_optimizer", True)
    s, b = config.data.seq_length, 2 * config.train.micro_batch_size
    rows = {
        "weights": e["rank_params"] * (2 if bf16 else 4),
        "gradients (fp32)": e["rank_params"] * 4,
        "optimizer (fp32 main + Adam)": e["rank_params"] * 12 / (dp if distributed else 1),
        "fp8 weight caches": e["linear_params"] * 2 if config.model.transformer.get("fp8")
        else 0.0,
        "resident reference": e["rank_params"] * 2 if config.reference.mode == "resident"
        else 0.0,
    }
    per_layer_act = 34 * s * b * e["h"] / e["tp"]
    penalty = 1 + (e["pp"] - 1) / (e["pp"] * e["vpp"])
    rows["activations (first stage)"] = per_layer_act * e["layers"] * penalty
    shard = e["vocab"] // e["tp"]
    rows["log-probs (last stage)"] = 2 * (s * b * shard * 2) + 64 * 2**20
    total = sum(rows.values())
    lines = [f"{config.source}: {e['total_params'] / 1e9:.2f}B parameters, world {world_size} "
             f"= TP {e['tp']} x PP {e['pp']} (VPP {e['vpp']}) x CP "
             f"{config.parallel.context_parallel_size} x DP {dp}; "
             f"{e['rank_params'] / 1e9:.3f}B parameters on the most loaded rank",
             f"{'part':<32}{'GiB':>8}"]
    lines += [f"{name:<32}{value / GIB:>8.1f}" for name, value in rows.items()]
    lines.append(f"{'total (estimate)':<32}{total / GIB:>8.1f}")
    return "\n".join(lines)


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: memory_estimate.py CONFIG.yaml WORLD_SIZE [section.key=value ...]")
    config = load_run_config(sys.argv[1], sys.argv[3:])
    world = int(sys.argv[2])
    print(report(config, world))


if __name__ == "__main__":
    main()
