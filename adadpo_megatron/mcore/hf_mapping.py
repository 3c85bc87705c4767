"""Hugging Face Llama-family checkpoints as megatron-core GPTModel weights, and back.

A Hugging Face model directory (config.json and safetensors, as ``save_pretrained`` writes
it) of model_type llama (Llama 2, 3, 3.1, 3.2, 3.3), mistral (without sliding window), qwen2
(QKV bias), qwen3 (per-head RMSNorm of queries and keys, head_dim from config.json) or
qwen3_moe (qwen3's attention, every layer's MLP a mixture of experts without shared experts)
maps onto megatron-core's GPTModel with RMSNorm, SwiGLU and RoPE:

    Hugging Face (model.)                 megatron-core (decoder.layers.i. for layer i)
    embed_tokens.weight                   embedding.word_embeddings.weight
    layers.i.input_layernorm.weight       self_attention.linear_qkv.layer_norm_weight
    layers.i.self_attn.{q,k,v}_proj.*     self_attention.linear_qkv.* (bias: qwen2)
    layers.i.self_attn.o_proj.weight      self_attention.linear_proj.weight
    layers.i.self_attn.{q,k}_norm.weight  self_attention.{q,k}_layernorm.weight (qwen3)
    layers.i.post_attention_layernorm.*   mlp.linear_fc1.layer_norm_weight
    layers.i.mlp.{gate,up}_proj.weight    mlp.linear_fc1.weight
    layers.i.mlp.down_proj.weight         mlp.linear_fc2.weight
    layers.i.mlp.gate.weight              mlp.router.weight (qwen3_moe)
    layers.i.mlp.experts.e.{gate,up}_proj mlp.experts.local_experts.e.linear_fc1.weight
    layers.i.mlp.experts.e.down_proj      mlp.experts.local_experts.e.linear_fc2.weight
    norm.weight                           decoder.final_layernorm.weight
    lm_head.weight                        output_layer.weight (absent when tied)

(The names are megatron-core's checkpoint names, which its local layer spec maps its own
``input_layernorm`` and ``pre_mlp_layernorm`` onto.) Megatron-core fuses Q, K and V per query
group: for each of the ``num_query_groups`` groups, its ``heads / groups`` query heads, then
its key head, then its value head, each ``head_dim`` rows. ``linear_fc1`` is the gate
projection stacked on the up projection. RoPE is not interleaved in either.

Llama 3.1-style rope scaling (rope_type llama3) is megatron-core's ``rope_scaling`` with its
factor; megatron-core fixes low_freq_factor 1, high_freq_factor 4 and
original_max_position_embeddings 8192 (Llama 3.1, 3.2 and 3.3 use exactly those), so any other
value is refused rather than silently computed differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from adadpo_megatron.mcore.lora import is_adapter_name
from adadpo_megatron.mcore.parameter_names import global_parameter_names

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
_MEGATRON_FIXED_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class HFArchitecture:
    """What the model section needs from a Hugging Face config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tied: bool
    qkv_bias: bool
    rope_scaling_factor: Optional[float]
    max_position_embeddings: int
    dtype: str
    qk_layernorm: bool = False  # qwen3: RMSNorm of each query and key head before RoPE
    # qwen3_moe: experts in every layer, top-k routing (renormalised over the k or not)
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_norm_topk_prob: bool = False

    def model_section(self) -> Dict[str, object]:
        """The model-section keys (megatron-core TransformerConfig fields and GPTModel
        arguments) of this architecture."""
        section = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, kv_channels=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size, normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps, gated_linear_unit=True, activation="swiglu",
            add_bias_linear=False, add_qkv_bias=self.qkv_bias, position_embedding_type="rope",
            rotary_base=self.rope_theta, share_embeddings_and_output_weights=self.tied,
            rope_scaling=self.rope_scaling_factor is not None, qk_layernorm=self.qk_layernorm)
        if self.rope_scaling_factor is not None:
            section["rope_scaling_factor"] = self.rope_scaling_factor
        if self.num_experts:
            # Top-k then a softmax over the k is softmax, top-k and renormalising, as
            # norm_topk_prob does; without it the softmax comes first. Experts as one module
            # each (not grouped GEMM), so that a parameter is one Hugging Face expert tensor.
            # The auxiliary load-balancing loss is off: preference training keeps the
            # pretrained routing (model.moe_router_load_balancing_type turns it on).
            section.update(num_moe_experts=self.num_experts,
                           moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                           moe_router_topk=self.moe_router_topk,
                           moe_router_pre_softmax=not self.moe_norm_topk_prob,
                           moe_grouped_gemm=False, moe_router_load_balancing_type="none",
                           moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall")
        return section


def read_architecture(directory) -> HFArchitecture:
    """The architecture of a local Hugging Face model directory.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: a model_type or setting this mapping does not cover, naming it.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.hf={str(directory)!r}: no config.json (a directory "
                                "written by transformers' save_pretrained)")
    config = json.loads(path.read_text())
    where = f"{path}"
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; "
                         f"adadpo-megatron maps {', '.join(SUPPORTED_MODEL_TYPES)} (for other "
                         "architectures convert with Megatron-Bridge and set model.load)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {config['hidden_act']!r}; only silu (SwiGLU)")
    if config.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if config.get("sliding_window") and config.get("use_sliding_window", True) \
            and model_type not in ("qwen2", "qwen3"):
        raise ValueError(f"{where}: sliding_window={config['sliding_window']} is not "
                         "supported (megatron-core's GPTModel attends to the whole sequence)")
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = None
    if rope_type == "llama3":
        for key, value in _MEGATRON_FIXED_LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                raise ValueError(f"{where}: rope {key}={rope.get(key)}; megatron-core's llama3 "
                                 f"rope scaling fixes it at {value}")
        factor = float(rope["factor"])
    elif rope_type not in ("default", None):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (default or "
                         "llama3)")
    moe = {}
    if model_type == "qwen3_moe":
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise ValueError(f"{where}: decoder_sparse_step={config.get('decoder_sparse_step')} "
                             f"/ mlp_only_layers={config.get('mlp_only_layers')}: only models "
                             "whose every layer is a mixture of experts are mapped")
        if config.get("shared_expert_intermediate_size"):
            raise ValueError(f"{where}: shared experts are not mapped")
        # the Hub's config.json says num_experts; transformers 5 writes num_local_experts
        moe = dict(num_experts=config.get("num_experts") or config["num_local_experts"],
                   moe_ffn_hidden_size=config["moe_intermediate_size"],
                   moe_router_topk=config["num_experts_per_tok"],
                   moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias"))
    return HFArchitecture(
        model_type=model_type, num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        rope_scaling_factor=factor,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"), **moe)


# --------------------------------------------------------------------------- tensors

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
# One tensor each side, in a layer: megatron-core's checkpoint name -> Hugging Face's.
_RENAMED = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}
# megatron-core's local layer spec names its norms apart; its checkpoints use the names above.
_LOCAL_SPEC_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                     "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


class HFTensors:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read one at a
    time so that nothing holds the whole model.

    Raises (on opening a file):
        ValueError: a safetensors file (or index) that is truncated or damaged, naming it.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{index} is truncated or damaged (not JSON with a "
                                 f"weight_map: {err})") from err
        else:
            single = self.directory / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{self.directory}: no model.safetensors nor "
                                        "model.safetensors.index.json")
            with _safe_open(single) as f:
                weight_map = {name: single.name for name in f.keys()}
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        with _safe_open(self.directory / self.weight_map[name]) as f:
            return f.get_tensor(name)


def _safe_open(path: Path):
    """safetensors' safe_open (it reads and checks the header and the file's length); a file
    cut short or with a header that is not JSON is a ValueError naming the file, not
    safetensors' own error from deep in a traceback."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or damaged ({err}); restore it or save the "
                         "model again") from err


def hf_prefix(tensors: HFTensors) -> str:
    return "model." if "model.embed_tokens.weight" in tensors else ""


def _fuse_qkv(q, k, v, arch: HFArchitecture) -> torch.Tensor:
    """[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...] along dim 0."""
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, *q.shape[1:])
    k = k.reshape(groups, d, *k.shape[1:])
    v = v.reshape(groups, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv(fused, arch: HFArchitecture):
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    fused = fused.reshape(groups, (per_group + 2) * d, *fused.shape[1:])
    q, k, v = fused.split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, *fused.shape[2:]), k.reshape(-1, *fused.shape[2:]),
            v.reshape(-1, *fused.shape[2:]))


def _mlp_linear(layer: str, rest: str) -> Tuple[str, Optional[str]]:
    """(the Hugging Face MLP's prefix, "linear_fc1" or "linear_fc2") of a layer's dense MLP
    or of one expert (by its global index, see parameter_names); (_, None) for other
    tensors."""
    expert = _EXPERT.match(rest)
    if expert is not None:
        return f"{layer}mlp.experts.{expert.group(1)}.", expert.group(2)
    if rest in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
        return f"{layer}mlp.", rest.split(".")[1]
    return f"{layer}mlp.", None


def megatron_tensor(name: str, tensors: HFTensors, arch: HFArchitecture) -> torch.Tensor:
    """The full (unsharded) megatron-core tensor ``name`` (a global checkpoint name, layer
    index included) built from the Hugging Face tensors it maps from."""
    p = hf_prefix(tensors)
    if name == "embedding.word_embeddings.weight":
        return tensors.get(f"{p}embed_tokens.weight")
    if name == "output_layer.weight":
        return tensors.get("lm_head.weight" if "lm_head.weight" in tensors
                           else f"{p}embed_tokens.weight")
    if name == "decoder.final_layernorm.weight":
        return tensors.get(f"{p}norm.weight")
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"no Hugging Face tensor maps to megatron-core's {name!r}")
    layer, rest = f"{p}layers.{match.group(1)}.", match.group(2)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return _fuse_qkv(*(tensors.get(f"{layer}self_attn.{x}_proj.{kind}") for x in "qkv"),
                         arch)
    mlp, linear = _mlp_linear(layer, rest)
    if linear == "linear_fc1":
        return torch.cat([tensors.get(f"{mlp}gate_proj.weight"),
                          tensors.get(f"{mlp}up_proj.weight")])
    if linear == "linear_fc2":
        return tensors.get(f"{mlp}down_proj.weight")
    rest = _LOCAL_SPEC_NAMES.get(rest, rest)
    if rest not in _RENAMED:
        raise KeyError(f"no Hugging Face tensor maps to megatron-core's {name!r}")
    return tensors.get(layer + _RENAMED[rest])


def hf_tensors(name: str, value: torch.Tensor, arch: HFArchitecture, prefix: str = "model."
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The Hugging Face (name, tensor) pairs that megatron-core's full tensor ``name`` holds
    (the inverse of ``megatron_tensor``)."""
    if name == "embedding.word_embeddings.weight":
        yield f"{prefix}embed_tokens.weight", value[:arch.vocab_size]
        return
    if name == "output_layer.weight":
        if not arch.tied:
            yield "lm_head.weight", value[:arch.vocab_size]
        return
    if name == "decoder.final_layernorm.weight":
        yield f"{prefix}norm.weight", value
        return
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"megatron-core tensor {name!r} has no Hugging Face counterpart")
    layer, rest = f"{prefix}layers.{match.group(1)}.", match.group(2)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        for x, part in zip("qkv", _split_qkv(value, arch), strict=True):
            yield f"{layer}self_attn.{x}_proj.{kind}", part
        return
    if rest in ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight"):
        # a distributed checkpoint stacks a layer's experts: [experts, out, in]
        for e, one in enumerate(value):
            yield from hf_tensors(f"decoder.layers.{match.group(1)}.mlp.experts.local_experts."
                                  f"{e}.{rest.split('.')[-2]}.weight", one, arch, prefix)
        return
    mlp, linear = _mlp_linear(layer, rest)
    if linear == "linear_fc1":
        gate, up = value.chunk(2)
        yield f"{mlp}gate_proj.weight", gate
        yield f"{mlp}up_proj.weight", up
        return
    if linear == "linear_fc2":
        yield f"{mlp}down_proj.weight", value
        return
    if rest not in _RENAMED:
        raise KeyError(f"megatron-core tensor {name!r} has no Hugging Face counterpart")
    yield layer + _RENAMED[rest], value


def shard_of(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int
             ) -> torch.Tensor:
    """This TP rank's shard of a full tensor, as megatron-core shards ``param``: along its
    partition_dim, in ``partition_stride`` interleaved pieces (GLU's gate and up halves)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(stride * tp_size, dim=dim)
    return torch.cat([pieces[s * tp_size + tp_rank] for s in range(stride)], dim=dim)


Loader = Callable[[str], torch.Tensor]


@torch.no_grad()
def load_hf_weights(chunks, directory, arch: HFArchitecture) -> None:
    """Fills this rank's model chunks (its TP shard of its pipeline stages) from a Hugging
    Face directory, one tensor at a time: a process holds its own shard plus one full tensor,
    never the whole model. LoRA adapters are not the checkpoint's: they are left as they are.

    Raises:
        ValueError: a tensor whose shape differs from the parameter's, naming both.
    """
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tensors = HFTensors(directory)
    for chunk in chunks:
        for name, param in global_parameter_names(getattr(chunk, "module", chunk)):
            if is_adapter_name(name):
                continue
            full = megatron_tensor(name, tensors, arch)
            shard = shard_of(full, param, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(f"{directory}: the tensors for {name!r} give shape "
                                 f"{tuple(shard.shape)} on this rank, the model has "
                                 f"{tuple(param.shape)}")
            param.copy_(shard)
