"""Attention that respects the segments of a packed micro-batch (``adadpo_megatron.data.packing``).

Two ways, as megatron-core offers them (``mcore.model.packed_format`` says which
the layer spec takes):

- ``"thd"`` (Transformer Engine's attention, or ``SDPADotProductAttention`` on megatron-core's
  local layers, CPU included): the micro-batch's rows are laid end to end as one sequence
  ``[1, R * S]`` and described by ``PackedSeqParams(qkv_format="thd")``, whose
  ``cu_seqlens`` mark every segment and every row's closing padding. Rotary positions
  restart per segment inside megatron-core. Under context parallelism every segment is split in
  ``2 * CP`` chunks and rank r keeps chunks r and ``2 * CP - 1 - r``, with Transformer Engine's
  ``thd_get_partitioned_indices`` (as megatron-core's ``get_batch_on_this_cp_rank`` does for
  THD), applied to ``segment_ids`` too so that the loss can reduce per segment.
- ``"mask"`` (megatron-core's local layers under context parallelism, or with an attention
  SDPA cannot stand in for): rows stay ``[R, S]`` and the attention gets an explicit
  block-diagonal causal mask, which megatron-core's local attention uses as it is. RoPE
  scores depend only on the distance between two positions, so within a block they are those
  of the segment alone although megatron-core's rotary embedding does not read
  ``position_ids`` (tested against the unpacked rows).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from adadpo_megatron.micro_batch import SEQUENCE_KEYS, MicroBatch

PACKED_FORMATS = ("thd", "mask")


def block_diagonal_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, 1, S, S] bool, True where attention is masked (megatron-core's convention): a token
    sees the tokens of its own segment up to itself. Row padding (-1) sees row padding only,
    so no softmax row is empty."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool,
                        device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def thd_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """[runs + 1] int32 cumulative lengths of the runs of one segment id in the rows laid end
    to end; a run never crosses a row boundary (each row's padding is its own run).

    A segment's alignment padding belongs to its run: it follows the segment's real tokens,
    so causal attention keeps it out of their outputs, and its labels are ignored.
    """
    rows, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True
    edges = torch.cat([starts.nonzero().squeeze(1), flat.new_tensor([rows * length])])
    return edges.to(torch.int32)


def thd_flatten(batch: MicroBatch) -> MicroBatch:
    """A packed micro-batch (CPU tensors) as one THD sequence: sequence keys ``[1, R * S]``,
    plus ``cu_seqlens`` (int32) and ``max_seqlen`` (int), read here so the device never
    waits."""
    cu_seqlens = thd_cu_seqlens(batch["segment_ids"])
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            out[key] = batch[key].reshape(1, -1)
    out["cu_seqlens"] = cu_seqlens
    out["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return out


def packed_seq_params(batch: MicroBatch):
    """megatron-core's PackedSeqParams for a ``thd_flatten``-ed batch (on its device)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def thd_partition_index(cu_seqlens: torch.Tensor, total: int, cp_size: int,
                        cp_rank: int) -> torch.Tensor:
    """The token indices this CP rank keeps of a THD sequence: of every run of length L
    (a multiple of 2 * cp_size), chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of
    size ``L / (2 * cp_size)``, run after run.

    Transformer Engine's ``thd_get_partitioned_indices`` where it is installed (the GPU path);
    otherwise the same split in torch (CPU tests; examples/gpu_check.py compares the two).
    """
    try:  # Transformer Engine: optional, GPU machines only
        import transformer_engine_torch as tex
    except ImportError:
        tex = None
    if tex is not None and cu_seqlens.is_cuda:
        return tex.thd_get_partitioned_indices(cu_seqlens, total, cp_size, cp_rank)
    pieces = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        chunk, remainder = divmod(end - start, 2 * cp_size)
        if remainder:
            raise ValueError(f"a packed segment of {end - start} tokens is not a multiple of "
                             f"2 * context_parallel_size ({2 * cp_size})")
        for part in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + part * chunk, start + (part + 1) * chunk))
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return index.to(cu_seqlens.device)


def thd_this_cp_rank(batch: MicroBatch, cp_group) -> MicroBatch:
    """A ``thd_flatten``-ed batch cut to this CP rank's tokens; ``cu_seqlens`` stay global,
    as Transformer Engine's context-parallel attention expects."""
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    if cp_size == 1:
        return batch
    total = batch["tokens"].shape[1]
    index = thd_partition_index(batch["cu_seqlens"], total, cp_size, dist.get_rank(cp_group))
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            out[key] = batch[key].index_select(1, index)
    return out


def packed_model_inputs(batch: Optional[MicroBatch]) -> Dict[str, object]:
    """GPTModel's attention arguments: ``attention_mask`` None (the layer spec's causal mask)
    for rows; for a packed batch its block-diagonal mask (the batch's ``attention_mask``,
    made before a context-parallel split, else of its ``segment_ids``), or
    ``packed_seq_params`` (THD)."""
    if batch is None or "segment_ids" not in batch:
        return {"attention_mask": None}
    if "cu_seqlens" in batch:
        return {"attention_mask": None, "packed_seq_params": packed_seq_params(batch)}
    if "attention_mask" in batch:
        return {"attention_mask": batch["attention_mask"]}
    return {"attention_mask": block_diagonal_causal_mask(batch["segment_ids"])}
