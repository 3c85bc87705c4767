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
    optimizer     float32 main params + Adam's two moments, 12 bytes/param, divided by
                  DP x CP with the distributed optimizer (megatron-core shards it over the
                  data-parallel group with context parallelism)
    fp8 copies    Transformer Engine's FP8 weight and transpose caches, 2 bytes per linear
                  parameter, when model.fp8 is set
    reference     resident reference weights, 2 bytes/param (none when precomputed, or
                  with LoRA's reference.mode adapters_off)
    LoRA          with model.lora, the base is frozen: its weights only; the adapters
                  (rank r on each targeted linear, sharded as adadpo_megatron.mcore.lora
                  shards them) get the gradients and the optimizer
    experts       with num_moe_experts, each rank holds 1 / EP of every layer's experts,
                  whose optimizer state is sharded over the expert-data-parallel ranks
                  (DP x CP / EP) only; activations are counted as for a dense layer (a
                  rough figure for a mixture of experts)
    activations   Korthikanti et al. 2022 (arXiv 2205.05198), sequence parallel + selective
                  recompute: 34 s b h / t bytes per layer and micro-batch (with
                  model.recompute_granularity full, megatron-core's recompute_method and
                  recompute_num_layers: a recomputed layer keeps its 2 s b h / t input, and
                  one group recomputes at a time; see _activations) (s b its tokens:
                  2 sequences per pair of seq_length, or data.max_tokens_per_micro_batch
                  packed; divided by CP, each CP rank holding 1 / CP of every sequence),
                  times the layers of all in-flight micro-batches of the first stage (PP of
                  them in 1F1B), times Megatron-LM's interleaving penalty
                  1 + (PP - 1) / (PP * VPP). Transformer Engine's fused attention keeps no
                  score matrix; under CP its ring holds two K/V chunks in flight (left out)
    log-probs     this project's op on the last stage: bf16 logits and their gradient for one
                  micro-batch's tokens on this CP rank, plus one float32 chunk
The last line is the activations' share of the total: what context parallelism divides.
It leaves out the CUDA context, NCCL buffers and allocator fragmentation (a few GiB).
"""

from __future__ import annotations

import math
import sys

from adadpo_megatron.mcore.lora import TARGETS
from adadpo_megatron.mcore.model import padded_vocab_size
from adadpo_megatron.training.layout import ParallelLayout
from adadpo_megatron.training.run_config import load_run_config

GIB = 2**30


def _lora_params_per_layer(config, tp) -> float:
    """This rank's adapter parameters of one layer (adadpo_megatron.mcore.lora's sharding:
    a column-parallel linear's A replicated and B split, a row-parallel linear's A split
    and B replicated), on the model's own linear shapes."""
    lora, shapes = config.model.lora, config.model.linear_shapes()
    r = lora.rank
    total = 0.0
    for name in lora.target_modules:
        fan_out, fan_in = shapes[name]
        column = TARGETS[name][1] == "column"
        total += r * fan_in + fan_out * r / tp if column else r * fan_in / tp + fan_out * r
    return total


def estimate(config) -> dict:
    t, p = config.model.transformer, config.parallel
    h, layers, heads = t["hidden_size"], t["num_layers"], t["num_attention_heads"]
    groups = t.get("num_query_groups") or heads
    ffn = t.get("ffn_hidden_size") or 4 * h
    kv = t.get("kv_channels") or h // heads
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ep = p.expert_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    vocab = config.model.vocab_size or padded_vocab_size(
        128256 if "llama3" in (config.model.preset or "") else 32000, config.model, tp)
    glu = 2 if t.get("gated_linear_unit") else 1
    attention = h * (heads * kv + 2 * groups * kv) + heads * kv * h
    experts = t.get("num_moe_experts")
    if experts:  # every layer's MLP: experts (split over EP, each over TP) and a router
        expert_per_layer = experts * (h * glu * t["moe_ffn_hidden_size"]
                                      + t["moe_ffn_hidden_size"] * h)
        mlp = h * experts
    else:
        expert_per_layer, mlp = 0, h * glu * ffn + ffn * h
    norms = 2 * h + (2 * kv if t.get("qk_layernorm") else 0)
    embedding = vocab * h
    # the first stage holds the input embedding, the last the output layer (and final norm)
    dense_rank = (attention + mlp + norms) * layers / pp / tp + \
        embedding / tp * (2 if pp == 1 else 1) + (h if pp == 1 else 0)
    expert_rank = expert_per_layer * layers / pp / tp / ep
    lora_rank = (_lora_params_per_layer(config, tp)
                 * layers / pp if config.model.lora else 0.0)
    linear_params = ((attention + mlp) * layers / pp / tp + expert_rank)
    return {"vocab": vocab,
            "total_params": (attention + mlp + norms + expert_per_layer) * layers
            + 2 * embedding + h,
            "active_params": None if not experts else (attention + mlp + norms) * layers
            + 2 * embedding + h + expert_per_layer * layers * t["moe_router_topk"] / experts,
            "dense_rank": dense_rank, "expert_rank": expert_rank, "lora_rank": lora_rank,
            "linear_params": linear_params,
            "h": h, "layers": layers, "tp": tp, "pp": pp, "vpp": vpp, "ep": ep}


def _activations(t, e, tokens, per_layer_act) -> float:
    """One micro-batch's activations on the first stage, by megatron-core's recompute
    setting: selective (per_layer_act a layer), or full, where a layer whose forward is
    recomputed keeps only its bf16 input (2 s b h / t): "uniform" keeps one input a group of
    recompute_num_layers layers and recomputes one group at a time, "block" recomputes the
    first recompute_num_layers layers of the stage and keeps the rest whole."""
    layers = e["layers"] / e["pp"]  # this stage's
    if t.get("recompute_granularity") != "full":
        return per_layer_act * layers * e["pp"]  # the PP micro-batches in flight
    method, group = t.get("recompute_method"), t.get("recompute_num_layers")
    if method not in ("uniform", "block") or not group:
        raise ValueError("model.recompute_granularity full needs model.recompute_method "
                         "(uniform or block) and model.recompute_num_layers, as megatron-core "
                         "does")
    layer_input = 2 * tokens * e["h"] / e["tp"]
    if method == "uniform":
        kept = math.ceil(layers / group) * layer_input
        live = group * per_layer_act
    else:
        recomputed = min(group, layers)
        kept = recomputed * layer_input + (layers - recomputed) * per_layer_act
        live = per_layer_act if recomputed else 0.0
    return kept * e["pp"] + live


def report(config, world_size: int) -> str:
    e = estimate(config)
    dp = ParallelLayout.of(config, world_size).dp
    cp = config.parallel.context_parallel_size
    expert_dp = dp * cp // e["ep"]
    bf16 = config.train.dtype == "bfloat16"
    distributed = config.optimizer.distributed(gpu=True)
    # tokens of one micro-batch: data.max_tokens_per_micro_batch when packed
    tokens = (config.micro_batch_tokens() if config.data.packing == "pack"
              else config.data.seq_length * 2 * config.train.micro_batch_size)
    weights = e["dense_rank"] + e["expert_rank"]
    if config.model.lora:  # the base is frozen: gradients and Adam for the adapters only
        trained, shards = e["lora_rank"], dp * cp if distributed else 1
        optimizer = trained * 12 / shards
    else:
        trained = weights
        optimizer = 12 * (e["dense_rank"] / (dp * cp if distributed else 1)
                          + e["expert_rank"] / (expert_dp if distributed else 1))
    rows = {
        "weights": weights * (2 if bf16 else 4),
        "LoRA adapters": e["lora_rank"] * (2 if bf16 else 4),
        "gradients (fp32)": trained * 4,
        "optimizer (fp32 main + Adam)": optimizer,
        "fp8 weight caches": e["linear_params"] * 2 if config.model.transformer.get("fp8")
        else 0.0,
        "resident reference": weights * 2 if config.reference.mode == "resident" else 0.0,
    }
    tokens /= cp  # this CP rank's share of every sequence
    per_layer_act = 34 * tokens * e["h"] / e["tp"]
    penalty = 1 + (e["pp"] - 1) / (e["pp"] * e["vpp"])
    rows["activations (first stage)"] = _activations(config.model.transformer, e, tokens,
                                                     per_layer_act) * penalty
    shard = e["vocab"] // e["tp"]
    rows["log-probs (last stage)"] = 2 * (tokens * shard * 2) + 64 * 2**20
    total = sum(rows.values())
    active = (f" ({e['active_params'] / 1e9:.2f}B active per token)" if e["active_params"]
              else "")
    lines = [f"{config.source}: {e['total_params'] / 1e9:.2f}B parameters{active}, world "
             f"{world_size} = TP {e['tp']} x PP {e['pp']} (VPP {e['vpp']}) x CP "
             f"{config.parallel.context_parallel_size} x DP {dp} (EP {e['ep']}); "
             f"{weights / 1e9:.3f}B parameters on the most loaded rank"
             + (f", {e['lora_rank'] / 1e6:.1f}M of LoRA adapters" if config.model.lora
                else ""),
             f"{'part':<32}{'GiB':>8}"]
    lines += [f"{name:<32}{value / GIB:>8.1f}" for name, value in rows.items()
              if value or name != "LoRA adapters"]
    lines.append(f"{'total (estimate)':<32}{total / GIB:>8.1f}")
    share = rows["activations (first stage)"] / total
    lines.append(f"activations: {share:.0%} of the total ({tokens:.0f} tokens a micro-batch on "
                 f"each CP rank)")
    return "\n".join(lines)


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: memory_estimate.py CONFIG.yaml WORLD_SIZE [section.key=value ...]")
    config = load_run_config(sys.argv[1], sys.argv[3:])
    world = int(sys.argv[2])
    print(report(config, world))


if __name__ == "__main__":
    main()
