"""LoRA adapters on megatron-core's tensor-parallel linear layers.

A LoRA adapter adds ``(alpha / rank) * B A x`` to a frozen linear's output ``W x`` (A is
[rank, in], B is [out, rank], B starts at zero so the adapted model starts as the base). It
attaches to the four linears of a transformer layer, sharded as the linear is:

    linear       megatron-core   A [rank, in]              B [out, rank]
    linear_qkv   column-parallel replicated over TP        split by rows, as W
    linear_fc1   column-parallel replicated over TP        split by rows, as W (gate|up)
    linear_proj  row-parallel    split by columns, as W    replicated over TP
    linear_fc2   row-parallel    split by columns, as W    replicated over TP

so each rank computes exactly its slice of ``B A x``, and the only communication is on the
rank-r activations ``A x`` (never on hidden-size ones): a column adapter all-reduces the
gradient of ``A x`` (or, under sequence parallelism, all-gathers ``A x`` over the sequence);
a row adapter all-reduces the partial ``A x`` (or reduce-scatters it over the sequence).
Where a rank then holds only part of a replicated tensor's gradient (sequence parallelism),
the parameter carries megatron-core's ``sequence_parallel`` attribute and
``finalize_model_grads`` sums it over TP, as it does for the layer norms.

The adapter is a sibling of its linear (``self_attention.linear_qkv_lora.lora_a``), not a
child: the base's parameter names, and so its checkpoints, Hugging Face mapping and
initialisation, are those of the model without LoRA. It runs from a forward hook on the
linear. Transformer Engine fuses the input norm into linear_qkv and linear_fc1; the adapter
needs the normalised input, which the module returns when its ``return_layernorm_output``
is set (what NeMo's and Megatron-Bridge's LoRA do).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from adadpo_megatron.mcore.parameter_names import global_parameter_names
from adadpo_megatron.validation import require_int, require_number

# the linear layers LoRA adapts, and how megatron-core shards each
TARGETS: Dict[str, Tuple[str, str]] = {
    "linear_qkv": ("self_attention", "column"),
    "linear_proj": ("self_attention", "row"),
    "linear_fc1": ("mlp", "column"),
    "linear_fc2": ("mlp", "row"),
}
SUFFIX = "_lora"


@dataclass
class LoRAConfig:
    """``model.lora``: LoRA adapters instead of training the whole model.

    Fields:
        rank: the adapters' rank r, >= 1.
        alpha: the scale's numerator: the adapter adds (alpha / rank) * B A x. None (the
            default) means 2 x rank, so the scale stays 2 whatever the rank (PEFT's default
            alpha is a constant 8, whose scale falls as the rank grows).
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: which of linear_qkv, linear_proj, linear_fc1, linear_fc2 to adapt
            (megatron-core's names; linear_qkv covers q_proj, k_proj and v_proj of a
            Hugging Face model, linear_fc1 gate_proj and up_proj).
    """

    rank: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self):
        require_int("model.lora.rank", self.rank)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        require_number("model.lora.alpha", self.alpha, low=0, low_open=True)
        require_number("model.lora.dropout", self.dropout, low=0, high=1, high_open=True)
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"model.lora.target_modules={self.target_modules!r} must be a "
                             f"non-empty list of {', '.join(TARGETS)}")
        for name in self.target_modules:
            if name not in TARGETS:
                raise ValueError(f"model.lora.target_modules: {name!r} is not a linear layer "
                                 f"LoRA adapts; choose from {', '.join(TARGETS)}")
        self.target_modules = list(dict.fromkeys(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(torch.nn.Module):
    """One linear's adapter, holding this rank's shards of A and B.

    Args:
        kind: "column" or "row": how the adapted linear is parallel.
        in_features, out_features: the linear's local weight shape's columns and rows.
        stride: the linear's partition_stride (2 for linear_fc1's gate|up rows under GLU).
        sequence_parallel: the linear runs with Megatron sequence parallelism.
        tp_group: the tensor-parallel group.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, lora: LoRAConfig, *,
                 stride: int, sequence_parallel: bool, tp_group, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.kind, self.scale, self.stride = kind, lora.scale, stride
        self.sequence_parallel, self.tp_group = sequence_parallel, tp_group
        self.enabled = True
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout else torch.nn.Identity()
        self.lora_a = torch.nn.Parameter(torch.zeros(lora.rank, in_features, dtype=dtype,
                                                     device=device))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, lora.rank, dtype=dtype,
                                            device=device))
        # the tensor-parallel one, as megatron-core marks its own sharded weights
        split, dim = (self.lora_b, 0) if kind == "column" else (self.lora_a, 1)
        split.tensor_model_parallel, split.partition_dim = True, dim
        split.partition_stride = stride if kind == "column" else 1
        replicated = self.lora_a if kind == "column" else self.lora_b
        # each TP rank holds the gradient of its sequence chunk only: summed over TP
        replicated.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the adapted linear's input on this rank ([s or s/TP, b, in_features]); returns
        its slice of the adapter's output, shaped like the linear's output."""
        from megatron.core.tensor_parallel import mappings

        h = F.linear(self.dropout(x), self.lora_a)  # [.., rank]: all communication is on h
        if self.kind == "column":
            h = (mappings.gather_from_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel
                 else mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group))
        else:
            h = (mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel
                 else mappings.reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.lora_b) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core's ShardedTensors for A and B, keyed by global shapes, so that an
        adapter checkpoint loads on any TP/PP layout (linear_fc1's B like its weight: gate
        and up rows apart)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axis = {"lora_b": 0} if self.kind == "column" else {"lora_a": 1}
        state = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.kind == "column" and self.stride == 2:
            key = f"{prefix}lora_b"
            state[key] = apply_swiglu_sharded_factory(
                state[key], sharded_offsets, metadata.get("singleton_local_shards", False),
                tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        return state


def _add_adapter_output(adapter: LoRAAdapter, module, args, output):
    """Forward hook of an adapted linear: its (output, bias) with the adapter's added."""
    x = args[0]
    if isinstance(output[0], tuple):  # TE's norm-fused linear: ((out, normalised x), bias)
        (out, x), bias = output
    elif len(output) == 3:  # the same with its bias returned: (out, bias, normalised x)
        out, bias, x = output
    else:
        out, bias = output
    if adapter.enabled:
        out = out + adapter(x)
    return out, bias


def attach_adapter(parent: torch.nn.Module, name: str, lora: LoRAConfig, *,
                   sequence_parallel: bool, tp_group) -> LoRAAdapter:
    """An adapter on ``parent``'s linear ``name`` (one of TARGETS), registered as
    ``parent.<name>_lora`` and run from a forward hook on the linear."""
    linear = getattr(parent, name)
    if hasattr(linear, "return_layernorm_output"):  # TE's norm-fused linear
        linear.return_layernorm_output = True
        linear.return_layernorm_output_gathered = False
    out_features, in_features = linear.weight.shape
    adapter = LoRAAdapter(TARGETS[name][1], in_features, out_features, lora,
                          stride=getattr(linear.weight, "partition_stride", 1),
                          sequence_parallel=sequence_parallel, tp_group=tp_group,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    parent.add_module(name + SUFFIX, adapter)
    linear.register_forward_hook(partial(_add_adapter_output, adapter))
    return adapter


def add_adapters(chunk: torch.nn.Module, lora: LoRAConfig, config) -> None:
    """Attaches adapters to ``lora.target_modules`` of every transformer layer of ``chunk``
    and freezes everything else (before DDP, which then keeps gradients for the adapters
    only).

    Raises:
        ValueError: a target the layers do not have (a mixture-of-experts layer has experts,
            not linear_fc1 / linear_fc2), naming model.lora.target_modules.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer

    tp_group = parallel_state.get_tensor_model_parallel_group()
    sequence_parallel = config.sequence_parallel and config.tensor_model_parallel_size > 1
    for layer in [m for m in chunk.modules() if isinstance(m, TransformerLayer)]:
        for name in lora.target_modules:
            parent_name = TARGETS[name][0]
            parent = getattr(layer, parent_name)
            if not hasattr(getattr(parent, name, None), "weight"):
                raise ValueError(
                    f"model.lora.target_modules: {name!r} is not in this model's "
                    f"{parent_name} ({type(parent).__name__}); LoRA adapts the dense "
                    "linears only (not mixture-of-experts experts): drop it")
            attach_adapter(parent, name, lora, sequence_parallel=sequence_parallel,
                           tp_group=tp_group)
    for name, param in chunk.named_parameters():
        param.requires_grad_(is_adapter_name(name))


def is_adapter_name(name: str) -> bool:
    """Whether a parameter (or state-dict key) belongs to a LoRA adapter."""
    return any(f"{target}{SUFFIX}." in name for target in TARGETS)


def adapters(chunks: Sequence[torch.nn.Module]) -> Iterator[LoRAAdapter]:
    for chunk in chunks:
        yield from (m for m in chunk.modules() if isinstance(m, LoRAAdapter))


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]):
    """The base model: every adapter of ``chunks`` switched off inside the block."""
    switched = [a for a in adapters(chunks) if a.enabled]
    for adapter in switched:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in switched:
            adapter.enabled = True


@torch.no_grad()
def init_adapters_(chunks: Sequence[torch.nn.Module], seed: int) -> None:
    """A from a generator seeded by (seed, global name), drawn whole and cut to this rank's
    shard, so every layout starts from the same adapters (and TP ranks holding a replicated A
    hold the same one); B zero. A's distribution is torch.nn.Linear's (and PEFT's):
    Kaiming-uniform with a = sqrt(5), over the full input width."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in global_parameter_names(chunk):
            if not is_adapter_name(name):
                continue
            if name.endswith("lora_b"):
                param.zero_()
                continue
            sharded = getattr(param, "tensor_model_parallel", False)
            full = torch.empty(param.shape[0], param.shape[1] * (tp if sharded else 1))
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            bound = 1 / math.sqrt(full.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            full.uniform_(-bound, bound, generator=generator)
            if sharded:
                full = full.chunk(tp, dim=1)[rank]
            param.copy_(full)
