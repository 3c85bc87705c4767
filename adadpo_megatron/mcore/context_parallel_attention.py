"""Context-parallel attention for megatron-core's local layers (no Transformer Engine).

Under context parallelism every sequence of ``S`` tokens is cut in ``2 x CP`` chunks and CP
rank ``r`` holds chunks ``r`` and ``2 x CP - 1 - r`` (the load-balanced order of
megatron-core's ``get_batch_on_this_cp_rank`` and of Transformer Engine), so its queries,
keys and values are ``S / CP`` tokens long. megatron-core's local ``DotProductAttention``
refuses CP (only ``TEDotProductAttention`` has it). ``ContextParallelDotProductAttention``
is the local attention made context-parallel the plain way, as Transformer Engine's
``cp_comm_type="all_gather"`` is:

1. K and V are all-gathered over the CP group with megatron-core's differentiable
   all-gather (``gather_from_sequence_parallel_region``: its backward reduce-scatters the
   gradients, so each rank gets the sum of every rank's gradient of its own chunks);
2. the gathered chunks are put back in sequence order;
3. the rank's queries attend under a mask of the true positions: causal by position and,
   for a packed micro-batch, within the segment (the forward step gives that mask as
   ``[b, 1, S / CP, S]``: its query rows split as megatron-core splits a batch's
   ``attention_mask``, its keys whole).

Rotary positions need nothing here: megatron-core's ``RotaryEmbedding`` already cuts its
table to the rank's chunks (``get_pos_emb_on_this_cp_rank``), so queries and keys arrive
rotated by their true positions.

The attention itself is ``SDPADotProductAttention``'s (torch's scaled_dot_product_attention
under that mask), which this class extends. What it costs: every rank holds the whole K and V
of its micro-batch, and SDPA's ``[S / CP, S]`` work per head, 1 / CP of one process's. It is
the path for CPU runs (tests, CI) and GPUs without Transformer Engine; with Transformer Engine
megatron-core's ``TEDotProductAttention`` is the path (p2p, a2a or all_gather, as
``cp_comm_type`` says).
"""

from __future__ import annotations

import copy
from typing import Optional

# megatron-core at import (a subclass needs its base); only the model builders import this
import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from adadpo_megatron.mcore.parallel_groups import default_group
from adadpo_megatron.mcore.sdpa_attention import (
    SDPADotProductAttention,
    core_attention_of,
    with_core_attention,
)


def chunk_positions(length: int, cp_size: int, cp_rank: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """[length / cp_size] long: the positions in a sequence of ``length`` tokens that CP rank
    ``cp_rank`` holds, chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` in that order."""
    chunks, remainder = divmod(length, 2 * cp_size)
    if remainder:
        raise ValueError(f"a sequence of {length} tokens cannot be cut in 2 * "
                         f"context_parallel_size = {2 * cp_size} equal chunks")
    return torch.cat([torch.arange(part * chunks, (part + 1) * chunks, device=device)
                      for part in (cp_rank, 2 * cp_size - 1 - cp_rank)])


def sequence_order(length: int, cp_size: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """[length] long: for each position, where the CP all-gather of every rank's tokens
    (rank 0's first) put it; ``gathered.index_select(0, order)`` is in sequence order."""
    gathered = torch.cat([chunk_positions(length, cp_size, rank, device)
                          for rank in range(cp_size)])
    return torch.argsort(gathered)


def causal_chunk_mask(length: int, cp_size: int, cp_rank: int,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """[1, 1, length / cp_size, length] bool, True where masked (megatron-core's convention):
    the rank's queries see the keys at their own position and before."""
    queries = chunk_positions(length, cp_size, cp_rank, device)
    keys = torch.arange(length, device=device)
    return (keys[None, :] > queries[:, None])[None, None]


class ContextParallelDotProductAttention(SDPADotProductAttention):
    """megatron-core's local attention (``SDPADotProductAttention``) over the load-balanced
    CP chunks.

    Takes what ``DotProductAttention`` takes (the layer spec builds it in its place) and has
    its parameters and state (none: softmax offsets are refused, as by
    ``SDPADotProductAttention``), so a checkpoint moves between CP sizes unchanged. The CP
    group is ``pg_collection.cp`` where given, else megatron-core's.

    forward(query [S/CP, b, np, hn], key and value [S/CP, b, ng, hn], attention_mask None
    (causal) or [b or 1, 1, S/CP, S] bool) -> context [S/CP, b, np * hn].
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        if config.window_size is not None:
            raise ValueError("window_size (sliding-window attention) with "
                             "context_parallel_size > 1 needs Transformer Engine's attention; "
                             "the local context-parallel attention has full causal masks only")
        # DotProductAttention refuses CP in its constructor; everything it builds is the
        # same for any CP size. The mask is always given (arbitrary): megatron-core's
        # default causal mask is square, and the rank's scores are [S/CP, S].
        single = copy.copy(config)
        single.context_parallel_size = 1
        super().__init__(single, layer_number, AttnMaskType.arbitrary, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        self.cp_group = default_group(getattr(pg_collection, "cp", None), "cp")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("the local context-parallel attention takes packed micro-batches "
                             "as a block-diagonal mask (packed_format 'mask'), not THD "
                             "PackedSeqParams, which need Transformer Engine")
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        length = key.shape[0] * cp_size
        order = sequence_order(length, cp_size, key.device)
        key = gather_from_sequence_parallel_region(key, group=self.cp_group).index_select(0, order)
        value = gather_from_sequence_parallel_region(value, group=self.cp_group).index_select(
            0, order)
        if attention_mask is None:
            attention_mask = causal_chunk_mask(length, cp_size, cp_rank, key.device)
        elif tuple(attention_mask.shape[-2:]) != (query.shape[0], length):
            raise ValueError(f"under context parallelism the attention mask must be "
                             f"[b, 1, S/CP, S] = [., 1, {query.shape[0]}, {length}] (its query "
                             f"rows this rank's chunks, its keys the whole sequence); got "
                             f"{tuple(attention_mask.shape)}")
        return super().forward(query, key, value, attention_mask,
                               attention_bias=attention_bias)


def with_context_parallel_attention(spec):
    """A GPT layer spec (a ModuleSpec of TransformerLayer) whose core attention is one of
    megatron-core's local ``DotProductAttention`` or ``SDPADotProductAttention``, with
    ``ContextParallelDotProductAttention`` in its place; a spec whose attention is already
    context-parallel is returned as it is.

    Raises:
        ValueError: the spec's core attention is neither (``check_context_parallel_spec``).
    """
    core = core_attention_of(spec)
    if _is_context_parallel(core):
        return spec
    if core not in (DotProductAttention, SDPADotProductAttention):
        raise ValueError(f"{_name(core)} has no local context-parallel version: only "
                         "megatron-core's DotProductAttention (or SDPADotProductAttention) "
                         "is replaced")
    return with_core_attention(spec, ContextParallelDotProductAttention)


def check_context_parallel_spec(spec, context_parallel_size: int) -> None:
    """Raises ValueError, naming parallel.context_parallel_size and the class, where a CP
    size > 1 meets a layer spec whose core attention cannot split the sequence (anything but
    Transformer Engine's ``TEDotProductAttention`` and ``ContextParallelDotProductAttention``)."""
    core = core_attention_of(spec)
    if context_parallel_size > 1 and not _is_context_parallel(core):
        raise ValueError(
            f"parallel.context_parallel_size={context_parallel_size} needs a context-parallel "
            f"attention in the layer spec, which has {_name(core)}: use Transformer Engine's "
            "layers (TEDotProductAttention) or megatron-core's local layers, whose "
            "DotProductAttention this project replaces (with_context_parallel_attention)")


def _is_context_parallel(core) -> bool:
    if isinstance(core, type) and issubclass(core, ContextParallelDotProductAttention):
        return True
    # Transformer Engine's attention, whatever module megatron-core exposes it from
    return any(cls.__name__ == "TEDotProductAttention"
               for cls in getattr(core, "__mro__", (type(core),)))


def _name(core) -> str:
    return getattr(core, "__qualname__", type(core).__name__)
