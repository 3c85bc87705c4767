"""Building megatron-core GPTModel chunks for the policy and the resident reference."""

from __future__ import annotations

import contextlib
import zlib
from typing import List, Optional

import torch
import torch.nn.functional as F

from adadpo_megatron.mcore.context_parallel_attention import (
    ContextParallelDotProductAttention,
    check_context_parallel_spec,
)
from adadpo_megatron.mcore.lora import LoRAConfig, add_adapters, is_adapter_name
from adadpo_megatron.mcore.model_config import ModelConfig, ParallelConfig
from adadpo_megatron.mcore.parameter_names import global_parameter_names
from adadpo_megatron.mcore.sdpa_attention import (
    SDPADotProductAttention,
    unsupported_reason,
    with_core_attention,
)

_ACTIVATIONS = {"gelu": F.gelu, "swiglu": F.silu, "relu": F.relu}
# Megatron initialises these with config.output_layer_init_method (scaled by depth).
_OUTPUT_LAYER_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp_size: int) -> int:
    """The vocabulary padded to a multiple of model.make_vocab_size_divisible_by.

    Unlike Megatron-LM, the multiple does not grow with the TP size, so that the padded
    vocabulary (and hence the softmax) is the same on every layout.
    """
    multiple = model.make_vocab_size_divisible_by
    padded = -(-vocab_size // multiple) * multiple
    if padded % tp_size:
        raise ValueError(f"the padded vocabulary ({padded} = {vocab_size} rounded up to "
                         f"model.make_vocab_size_divisible_by={multiple}) is not divisible "
                         f"by parallel.tensor_model_parallel_size({tp_size})")
    return padded


def model_vocab_size(tokenizer_vocab: int, model: ModelConfig, tp_size: int) -> int:
    """The model's vocabulary: model.vocab_size (a Hugging Face model's own, which may hold
    more rows than its tokenizer has tokens) or the tokenizer's, padded."""
    if model.vocab_size is None:
        return padded_vocab_size(tokenizer_vocab, model, tp_size)
    if tokenizer_vocab > model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's "
                         f"vocabulary ({model.vocab_size}); use the model's own tokenizer")
    if model.vocab_size % tp_size:
        raise ValueError(f"the model's vocabulary ({model.vocab_size}) is not divisible by "
                         f"parallel.tensor_model_parallel_size({tp_size})")
    return model.vocab_size


def _unfused_swiglu_reason(activation: str, fields) -> Optional[str]:
    """Why megatron-core's fused SwiGLU would not compute the MLP the model section asks
    for, or None where it does: a gated SiLU without gpt-oss's clamp or linear offset, not
    Transformer Engine's activation (which megatron-core refuses beside it), and no expert
    bias (its weighted form, the experts', has none)."""
    if activation != "swiglu":
        return f"model.activation={activation!r}"
    if not fields.get("gated_linear_unit"):
        return "model.gated_linear_unit is not set"
    if fields.get("glu_linear_offset"):
        return f"model.glu_linear_offset={fields['glu_linear_offset']}"
    if fields.get("activation_func_clamp_value") is not None:
        return f"model.activation_func_clamp_value={fields['activation_func_clamp_value']}"
    if fields.get("use_te_activation_func"):
        return "model.use_te_activation_func=true"
    if fields.get("num_moe_experts") and fields.get("add_bias_linear", True):
        return "model.add_bias_linear=true (megatron-core's default) with experts"
    return None


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, dtype: torch.dtype,
                       gpu: bool, variable_seq_lengths: bool = False):
    """megatron-core's TransformerConfig for the model and layout.

    ``variable_seq_lengths``: micro-batches of one step differ in length (data.packing
    longest or pack), so pipeline stages exchange shapes before tensors.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(model.transformer)
    fields.setdefault("hidden_dropout", 0.0)
    fields.setdefault("attention_dropout", 0.0)
    # megatron-core's SwiGLU function keeps fc1's output and recomputes the activation in the
    # backward, where its unfused GLU also keeps silu(gate) and a copy of the linear half (two
    # of the five FFN-wide tensors an MLP keeps per token). On by default, as in Megatron-LM
    # (--no-bias-swiglu-fusion turns it off there); on the CPU cpu_compat runs it uncompiled.
    unfused = _unfused_swiglu_reason(model.activation, fields)
    if model.activation == "swiglu" and fields.get("bias_activation_fusion") and unfused:
        raise ValueError(f"model.bias_activation_fusion=true: megatron-core's fused SwiGLU "
                         f"does not compute this MLP ({unfused}); remove the key")
    fields.setdefault("bias_activation_fusion", unfused is None)
    if not gpu:  # fused kernels (apex, TE, triton) need a GPU
        for key in ("gradient_accumulation_fusion", "bias_dropout_fusion",
                    "masked_softmax_fusion", "apply_rope_fusion", "persist_layer_norm"):
            fields[key] = False
        if unfused:
            # megatron-core's fused GELUs need torch.compile; cpu_compat uncompiles SwiGLU's
            fields["bias_activation_fusion"] = False
    variable_seq_lengths = variable_seq_lengths and parallel.pipeline_model_parallel_size > 1
    if parallel.pipeline_model_parallel_size > 1:
        # megatron-core refuses variable lengths with its default MoE dispatcher, even in a
        # dense model; alltoall is the one it accepts (and an evaluation may exchange shapes
        # where training does not: variable_shapes)
        fields.setdefault("moe_token_dispatcher_type", "alltoall")
    if parallel.virtual_pipeline_model_parallel_size:
        # Megatron-LM's defaults for interleaving. Batched p2p would also post two messages to
        # the same peer when PP = 2 (it is both the previous and the next stage), which gloo
        # matches in posting order and so swaps activations and gradients.
        fields.setdefault("overlap_p2p_comm", True)
        fields.setdefault("batch_p2p_comm", False)
    return TransformerConfig(
        **fields,
        activation_func=_ACTIVATIONS[model.activation],
        **parallel.megatron_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not gpu,
        # (loss sum, pair count) from loss_func; megatron divides by the global pair count
        calculate_per_token_loss=True,
        variable_seq_lengths=variable_seq_lengths,
    )


def layer_spec(transformer_engine: bool, config):
    """megatron-core's GPT layer spec for the config: Transformer Engine's layers where
    ``transformer_engine``, else the local ones with ``local_core_attention(config)`` as
    their core attention; q/k norms and experts (one module each, see hf_mapping) as set."""
    from megatron.core.models.gpt import gpt_layer_specs

    options = dict(qk_layernorm=config.qk_layernorm, num_experts=config.num_moe_experts,
                   moe_grouped_gemm=config.moe_grouped_gemm)
    if transformer_engine:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**options)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**options)
        core = local_core_attention(config)
        if core is not None:
            spec = with_core_attention(spec, core)
    check_context_parallel_spec(spec, config.context_parallel_size)
    return spec


def local_core_attention(config):
    """The core attention the local layer spec gets in place of megatron-core's
    ``DotProductAttention`` (None: that one stays): under context parallelism
    ``ContextParallelDotProductAttention``, else ``SDPADotProductAttention`` unless the
    config needs what only megatron-core's has (``sdpa_attention.unsupported_reason``)."""
    if config.context_parallel_size > 1:
        return ContextParallelDotProductAttention
    return SDPADotProductAttention if unsupported_reason(config) is None else None


def packed_format(transformer_engine: bool, config) -> str:
    """How packed micro-batches reach the attention ``layer_spec`` builds for ``config`` (a
    TransformerConfig): "thd" (PackedSeqParams, each segment attended alone) for Transformer
    Engine's attention and ``SDPADotProductAttention``; "mask" (a block-diagonal mask) for
    the local context-parallel attention and megatron-core's own local one."""
    if transformer_engine or local_core_attention(config) is SDPADotProductAttention:
        return "thd"
    return "mask"


def uses_transformer_engine(gpu: bool) -> bool:
    """Whether ``build_model_chunks`` builds Transformer Engine layers (a GPU with TE)."""
    if not gpu:
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    try:
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    except (ImportError, AssertionError):
        return False
    return True


@contextlib.contextmanager
def variable_shapes(chunks: List[torch.nn.Module], needed: bool):
    """Pipeline stages exchange shapes before tensors inside the block when ``needed`` (the
    micro-batches of one schedule call differ in shape), as ``variable_seq_lengths`` makes
    them; off again after it, so that steps of fixed shapes pay no exchange (and no device
    synchronisation) per micro-batch. The chunks share one TransformerConfig."""
    config = getattr(chunks[0], "config", None)
    before = getattr(config, "variable_seq_lengths", False)
    if needed and config is not None and config.pipeline_model_parallel_size > 1:
        config.variable_seq_lengths = True
    try:
        yield
    finally:
        if config is not None:
            config.variable_seq_lengths = before


def build_model_chunks(model: ModelConfig, config, vocab_size: int, seq_length: int, *,
                       gpu: bool, lora: Optional[LoRAConfig] = None) -> List[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), not yet DDP-wrapped;
    with ``lora``, with adapters and everything else frozen (see init_adapters_)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(uses_transformer_engine(gpu), config),
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp_stage,
        )
        if not gpu:
            chunk.to(config.params_dtype)
        if not model.moe_train_router:
            for name, param in chunk.named_parameters():
                if ".mlp.router." in name:  # before DDP, which then keeps no gradient for it
                    param.requires_grad_(False)
        if lora is not None:
            add_adapters(chunk, lora, config)
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def canonical_init_(chunks: List[torch.nn.Module], config, seed: int) -> None:
    """Re-initialises every tensor-parallel weight independently of the parallel layout.

    Each weight's full (unsharded) master tensor is drawn from a generator seeded by
    (seed, global parameter name) with megatron's init method for it, and this rank's shard
    is cut out with megatron-core's own splitting (stride-aware, so fused QKV and GLU
    weights shard as megatron shards them). So TP, PP and VPP layouts start from the same
    weights as the single-process model. Norm weights and biases keep megatron's constant
    initialisation. CPU runs use it; GPU runs start from checkpoints. LoRA adapters are
    left to init_adapters_.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in global_parameter_names(chunk):
            if (not getattr(param, "tensor_model_parallel", False) or param.dim() != 2
                    or is_adapter_name(name)):
                continue
            dim = param.partition_dim
            full = list(param.shape)
            full[dim] *= tp
            init = (config.output_layer_init_method if name.endswith(_OUTPUT_LAYER_SUFFIXES)
                    else config.init_method)
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            _initialize_affine_weight_cpu(
                param, full[0], full[1], param.shape[dim], dim, init,
                stride=getattr(param, "partition_stride", 1), params_dtype=param.dtype,
                rank=rank, world_size=tp, skip_set_tensor_parallel_attributes=True)
