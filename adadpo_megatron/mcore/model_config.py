"""The model and parallel-layout sections: what megatron-core's GPTModel is built from.

``ModelConfig`` holds megatron-core TransformerConfig fields plus GPTModel arguments (with
presets for Llama-3 shapes); ``ParallelConfig`` the TP/PP/VPP/CP layout. Both validate
themselves in ``__post_init__`` with errors naming the full config key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from adadpo_megatron.mcore.hf_mapping import read_architecture
from adadpo_megatron.mcore.lora import LoRAConfig
from adadpo_megatron.validation import (
    from_mapping,
    require_choice,
    require_int,
    require_like_defaults,
)


def _from_hf(section: Dict[str, Any]) -> Dict[str, Any]:
    """The model section a Hugging Face config.json implies; a user key that contradicts it
    is an error naming both values."""

    directory = Path(section["hf"])
    arch = read_architecture(directory)
    implied = {**arch.model_section(), "vocab_size": arch.vocab_size}
    for key in HF_ARCHITECTURE_KEYS:
        if key in section and key in implied and section[key] != implied[key]:
            raise ValueError(f"model.{key}={section[key]!r} contradicts model.hf's "
                             f"{directory / 'config.json'} ({implied[key]!r}); remove "
                             f"model.{key}")
    return implied

# Model presets: megatron-core TransformerConfig fields plus GPTModel arguments.
MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
                 activation="swiglu", add_bias_linear=False, position_embedding_type="rope",
                 init_method_std=0.02),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                      num_query_groups=8, ffn_hidden_size=14336, normalization="RMSNorm",
                      gated_linear_unit=True, activation="swiglu", add_bias_linear=False,
                      position_embedding_type="rope", rotary_base=500000,
                      layernorm_epsilon=1e-5),
    "llama3-70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64,
                       num_query_groups=8, ffn_hidden_size=28672, normalization="RMSNorm",
                       gated_linear_unit=True, activation="swiglu", add_bias_linear=False,
                       position_embedding_type="rope", rotary_base=500000,
                       layernorm_epsilon=1e-5),
}
# Llama 3.1 (and 3.3 for 70B): the same shapes with rope scaling, factor 8.
MODEL_PRESETS["llama3.1-8b"] = dict(MODEL_PRESETS["llama3-8b"], rope_scaling=True,
                                    rope_scaling_factor=8.0)
MODEL_PRESETS["llama3.1-70b"] = dict(MODEL_PRESETS["llama3-70b"], rope_scaling=True,
                                     rope_scaling_factor=8.0)

# Keys of the model section that are GPTModel arguments or ours, not TransformerConfig fields.
MODEL_EXTRA_KEYS = ("preset", "position_embedding_type", "rotary_base",
                    "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
                    "activation", "load", "fused_logprobs", "rope_scaling",
                    "rope_scaling_factor", "hf", "vocab_size", "moe_train_router", "lora")
# What model.hf decides; the user may still set everything else (parallelism, precision, ...).
HF_ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                        "kv_channels", "ffn_hidden_size", "normalization", "layernorm_epsilon",
                        "gated_linear_unit", "activation", "add_bias_linear", "add_qkv_bias",
                        "position_embedding_type", "rotary_base",
                        "share_embeddings_and_output_weights", "rope_scaling",
                        "rope_scaling_factor", "qk_layernorm", "num_moe_experts",
                        "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
                        "moe_grouped_gemm", "vocab_size")
ACTIVATIONS = ("gelu", "swiglu", "relu")


@dataclass
class ModelConfig:
    """The policy (and reference) architecture.

    Fields:
        preset: a name from MODEL_PRESETS, whose values the other keys override.
        transformer: megatron-core TransformerConfig fields (num_layers, hidden_size, ...).
        position_embedding_type: "rope" or "learned_absolute".
        rotary_base: RoPE base.
        share_embeddings_and_output_weights: tie input and output embeddings.
        make_vocab_size_divisible_by: the vocabulary is padded to a multiple of this (not of
            this times the tensor-parallel size, as Megatron-LM pads it, so that the padded
            vocabulary, and with it the softmax, is the same on every layout; the padded size
            must then divide by TP, checked).
        activation: "gelu", "swiglu" (with gated_linear_unit) or "relu".
        load: a megatron-core distributed checkpoint (torch_dist; this project's or
            Megatron-LM's, any TP/PP layout) to start the policy from; None starts from
            initialisation.
        fused_logprobs: compute log-probs from the last hidden states inside GPTModel's
            output_processor hook, never materialising the logits.
        rope_scaling: Llama 3.1-style RoPE scaling (megatron-core's; low_freq_factor 1,
            high_freq_factor 4, original context 8192). A Llama 3.1/3.2/3.3 checkpoint without
            it gives wrong log-probs beyond short contexts.
        rope_scaling_factor: its factor (8 for Llama 3.1 and 3.3, 32 for 3.2).
        hf: a local Hugging Face model directory (config.json + safetensors) of the Llama
            family (llama, mistral, qwen2, qwen3, qwen3_moe): the architecture comes from its
            config.json, the weights from its safetensors (imported once into
            output_dir/hf_import), and data.tokenizer defaults to it. Setting an
            architecture key to another value than config.json's is an error.
        vocab_size: the model's own vocabulary (set by model.hf); None pads the tokenizer's.
        moe_train_router: with experts (num_moe_experts), train the router too. False (the
            default) freezes it, so that preference training keeps the pretrained routing;
            megatron-core's auxiliary losses are off unless moe_router_load_balancing_type
            and moe_aux_loss_coeff turn them on.
        lora: LoRA adapters (adadpo_megatron.mcore.lora.LoRAConfig: rank, alpha, dropout,
            target_modules) on a frozen base that model.hf or model.load gives; None trains
            every weight.
    """

    preset: Optional[str] = None
    transformer: Dict[str, Any] = field(default_factory=dict)
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    share_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    activation: str = "gelu"
    load: Optional[str] = None
    fused_logprobs: bool = False
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    hf: Optional[str] = None
    vocab_size: Optional[int] = None
    moe_train_router: bool = False
    lora: Optional[LoRAConfig] = None

    @classmethod
    def from_section(cls, section: Optional[Dict[str, Any]]) -> ModelConfig:
        """The section, with a preset's or model.hf's values under the user's (a relative
        model.hf is relative to the working directory, as every path of a run config)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        section = dict(section or {})
        preset = section.get("preset")
        if preset is not None and preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset={preset!r} is not a preset; choose one of "
                             f"{', '.join(MODEL_PRESETS)}")
        defaults = dict(MODEL_PRESETS.get(preset, {}))
        if section.get("hf"):
            if preset is not None:
                raise ValueError("set model.preset or model.hf, not both")
            defaults = _from_hf(section)
        merged = {**defaults, **section}
        known = {f.name for f in dataclasses.fields(TransformerConfig)}
        extra = {k: merged.pop(k) for k in list(merged) if k in MODEL_EXTRA_KEYS}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join('model.' + k for k in unknown)}: "
                             "neither a megatron-core TransformerConfig field nor one of "
                             f"{', '.join('model.' + k for k in MODEL_EXTRA_KEYS)}")
        require_like_defaults(TransformerConfig, merged, "model")
        if extra.get("lora") is not None:
            if not isinstance(extra["lora"], dict):
                raise ValueError(f"model.lora must be a mapping (rank, alpha, dropout, "
                                 f"target_modules), got {extra['lora']!r}")
            extra["lora"] = from_mapping(LoRAConfig, extra["lora"], "model.lora")
        return cls(transformer=merged, **extra)

    def __post_init__(self):
        require_choice("model.position_embedding_type", self.position_embedding_type,
                       ("rope", "learned_absolute"))
        require_choice("model.activation", self.activation, ACTIVATIONS)
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if key not in self.transformer:
                raise ValueError(f"model.{key} is required (or pick a model.preset)")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "ffn_hidden_size", "kv_channels"):
            if self.transformer.get(key) is not None:
                require_int(f"model.{key}", self.transformer[key])
        if not self.transformer.get("num_moe_experts"):
            moe_keys = sorted(k for k in self.transformer if k.startswith("moe_")
                              and self.transformer[k] is not None)
            if self.moe_train_router:
                moe_keys.append("moe_train_router")
            if moe_keys:
                raise ValueError(f"{', '.join('model.' + k for k in moe_keys)} set on a dense "
                                 "model: mixture-of-experts keys need model.num_moe_experts "
                                 "(or a model.hf with experts)")
        elif self.lora is not None:
            mlp = [m for m in self.lora.target_modules if m in ("linear_fc1", "linear_fc2")]
            if mlp:
                raise ValueError(f"model.lora.target_modules has {', '.join(mlp)}, which a "
                                 "mixture-of-experts layer does not have (its MLP is experts, "
                                 "which LoRA does not adapt); target linear_qkv and "
                                 "linear_proj")
        if self.lora is not None and not (self.hf or self.load):
            raise ValueError("model.lora trains adapters on a pretrained base: set model.hf "
                             "or model.load")
        if self.lora is not None:
            for name, (rows, columns) in self.linear_shapes().items():
                if name in self.lora.target_modules and self.lora.rank > min(rows, columns):
                    raise ValueError(
                        f"model.lora.rank={self.lora.rank} is larger than {name}'s smaller "
                        f"side ({rows} x {columns}): B A would have more parameters than the "
                        f"weight it adapts and no lower rank; use a rank <= "
                        f"{min(rows, columns)} or leave {name} out of "
                        "model.lora.target_modules")

    def linear_shapes(self) -> Dict[str, tuple]:
        """{linear: (out, in)} of a layer's four linears, whole (not per TP rank)."""
        t = self.transformer
        hidden, heads = t["hidden_size"], t["num_attention_heads"]
        groups = t.get("num_query_groups") or heads
        head_dim = t.get("kv_channels") or hidden // heads
        ffn = t.get("ffn_hidden_size") or 4 * hidden
        gated = 2 if t.get("gated_linear_unit") else 1
        return {"linear_qkv": ((heads + 2 * groups) * head_dim, hidden),
                "linear_proj": (hidden, heads * head_dim),
                "linear_fc1": (gated * ffn, hidden), "linear_fc2": (hidden, ffn)}


@dataclass
class ParallelConfig:
    """The parallel layout; data parallelism is what is left of the world size.

    Fields:
        tensor_model_parallel_size: TP, >= 1; divides the attention heads.
        pipeline_model_parallel_size: PP, >= 1; with VPP, divides the layers into PP * VPP.
        virtual_pipeline_model_parallel_size: VPP (interleaved 1F1B), None or >= 2 with PP > 1.
        context_parallel_size: CP, >= 1: Transformer Engine's attention on a GPU, the local
            context-parallel attention without it (mcore/context_parallel_attention.py).
        sequence_parallel: Megatron sequence parallelism, needs TP > 1.
        expert_model_parallel_size: EP, >= 1: the experts of a mixture-of-experts model are
            split over this many ranks of the data-parallel (times context-parallel) ranks,
            tokens reaching them by megatron-core's all-to-all dispatcher. Must divide the
            number of experts.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1

    def __post_init__(self):
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "context_parallel_size", "expert_model_parallel_size"):
            require_int(f"parallel.{key}", getattr(self, key))
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            require_int("parallel.virtual_pipeline_model_parallel_size", vpp, low=2)
            if self.pipeline_model_parallel_size < 2:
                raise ValueError("parallel.virtual_pipeline_model_parallel_size needs "
                                 "parallel.pipeline_model_parallel_size >= 2, got "
                                 f"{self.pipeline_model_parallel_size}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel=true needs "
                             "parallel.tensor_model_parallel_size > 1")

    def megatron_sizes(self) -> Dict[str, Optional[int]]:
        """The layout as the keyword arguments that megatron-core's
        ``parallel_state.initialize_model_parallel`` and ``TransformerConfig`` both take."""
        return {key: getattr(self, key) for key in (
            "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size", "context_parallel_size",
            "expert_model_parallel_size")}

