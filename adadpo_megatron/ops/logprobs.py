"""From vocab-sharded logits to whole-sequence log-prob statistics: the TP and CP reductions.

Two steps, each one collective deep:

1. ``vocab_parallel_logprobs``: per-token log-probs ``log softmax(logits)[label]`` from logits
   whose vocabulary is split across the tensor-parallel group (megatron-core's layout: rank r
   owns the contiguous block ``[r * V/TP, (r + 1) * V/TP)``). Each rank reduces its block to a
   per-token log-sum-exp and reads the target logit where it owns it; the per-token maxima are
   all-reduced (MAX), then the rescaled sum-exps and target logits together (SUM). No rank ever
   holds a full-vocab tensor, and the work runs in float32 chunks of tokens, recomputing the
   softmax in backward, so the memory beyond the logits and their gradient is one chunk.
2. ``sequence_logprobs``: per-sequence sums of those log-probs under the loss mask, and token
   counts, all-reduced over the context-parallel group, differentiably, so that the AdaDPO
   coefficient is formed from whole sequences, never from a shard.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup

# Size of one float32 chunk of logits unless chunk_size says otherwise. On a CPU a chunk that
# stays in the last-level cache is about 1.6x faster than a 32 MiB one (benchmarks/); on a GPU
# larger chunks amortise the kernel launches of the per-chunk loop.
DEFAULT_CHUNK_BYTES = {"cpu": 4 * 1024 * 1024}
DEFAULT_CHUNK_BYTES_ACCELERATOR = 64 * 1024 * 1024


# --------------------------------------------------------------------------- groups


# A group of None (or of size 1) means "no reduction": the op then sees the whole vocabulary
# or the whole sequence in this process. The ops take their groups from the caller and never
# ask megatron-core for one; adadpo_megatron.mcore.parallel_groups gives the same functions
# megatron-core's groups as defaults (the ones ``import adadpo_megatron`` exports).


def group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


# --------------------------------------------------------------------------- per-token op


def chunk_rows(num_rows: int, vocab_shard: int, chunk_size: Optional[int],
               device: torch.device) -> int:
    """Rows (tokens) per chunk: ``chunk_size``, else what keeps one fp32 chunk of
    [rows, vocab_shard] under the device's budget (the fused path shares it)."""
    if chunk_size is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES_ACCELERATOR)
        chunk_size = chunk_bytes // (4 * max(vocab_shard, 1))
    return max(1, min(int(chunk_size), max(num_rows, 1)))


def token_targets(labels: Tensor, vocab_shard: int, tp_group: Optional[ProcessGroup],
                  ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(ignored [N] bool, owned [N] bool, local target index [N] long, 0 where not owned)
    for this rank's contiguous vocab block."""
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    ignored = labels == ignore_index
    local = labels - tp_rank * vocab_shard
    owned = (local >= 0) & (local < vocab_shard) & ~ignored
    return ignored, owned, torch.where(owned, local, torch.zeros_like(local))


def row_scales(grad_logps: Tensor, ignored: Tensor, owned: Tensor) -> Tuple[Tensor, Tensor]:
    """(g [N], g at the owned target [N]): the incoming gradient, 0 on ignored tokens."""
    g = torch.where(ignored, torch.zeros_like(grad_logps), grad_logps.float())
    return g, torch.where(owned, g, torch.zeros_like(g))


def check_labels(labels: Tensor, ignored: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raises ValueError naming the first label outside [0, vocab_size) (ignore_index aside)."""
    bad = ~ignored & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        where = bad.nonzero()[0]
        raise ValueError(
            f"label {labels[where[0]].item()} at flattened token {where[0].item()} is outside "
            f"the vocabulary [0, {vocab_size}) = vocab shard x tensor-parallel size, and is not "
            f"ignore_index={ignore_index}"
        )


def _forward(logits2d: Tensor, labels: Tensor, tp_group: Optional[ProcessGroup],
             ignore_index: int, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Returns (log-probs [N] fp32, 0 where ignored; global log-sum-exp [N] fp32)."""
    num_rows, vocab_shard = logits2d.shape
    ignored, owned, local_target = token_targets(labels, vocab_shard, tp_group, ignore_index)
    check_labels(labels, ignored, vocab_shard * group_size(tp_group), ignore_index)

    rows = chunk_rows(num_rows, vocab_shard, chunk_size, logits2d.device)
    buffer = torch.empty((rows, vocab_shard), dtype=torch.float32, device=logits2d.device)
    local_lse = torch.empty(num_rows, dtype=torch.float32, device=logits2d.device)
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        x = buffer[: end - start]
        x.copy_(logits2d[start:end])
        row_max = x.amax(dim=-1)
        x.sub_(row_max.unsqueeze(-1)).exp_()
        local_lse[start:end] = row_max + x.sum(dim=-1).log()
    del buffer

    target_logit = logits2d.gather(1, local_target.unsqueeze(1)).squeeze(1).float()
    return combine_over_tp(local_lse, target_logit, owned, ignored, tp_group)


def combine_over_tp(local_lse: Tensor, target_logit: Tensor, owned: Tensor, ignored: Tensor,
                    tp_group: Optional[ProcessGroup]) -> Tuple[Tensor, Tensor]:
    """Per-token log-probs from each rank's vocab-shard log-sum-exp and target logit.

    One MAX all-reduce of the per-token maxima, one SUM all-reduce of the stacked rescaled
    sum-exps and target logits (read where owned, 0 elsewhere).
    Returns (log-probs [N] fp32, 0 where ignored; global log-sum-exp [N] fp32).
    """
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
    if group_size(tp_group) > 1:
        global_max = local_lse.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        # A shard whose logits are all -inf contributes exp(-inf) = 0 here, not NaN.
        partial = torch.stack([torch.exp(local_lse - global_max), target_logit])
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
        lse = global_max + partial[0].log()
        target_logit = partial[1]
    else:
        lse = local_lse
    logps = torch.where(ignored, torch.zeros_like(lse), target_logit - lse)
    return logps, lse


def _backward(grad_logps: Tensor, logits2d: Tensor, labels: Tensor, lse: Tensor,
              tp_group: Optional[ProcessGroup], ignore_index: int,
              chunk_size: Optional[int]) -> Tensor:
    """d logp / d logits = onehot(label) - softmax, scaled per row, recomputed per chunk."""
    num_rows, vocab_shard = logits2d.shape
    ignored, owned, local_target = token_targets(labels, vocab_shard, tp_group, ignore_index)
    g, g_target = row_scales(grad_logps, ignored, owned)

    grad = torch.empty_like(logits2d)
    rows = chunk_rows(num_rows, vocab_shard, chunk_size, logits2d.device)
    # float32 logits get their gradient written in place; other dtypes go through one fp32 chunk.
    buffer = None
    if logits2d.dtype != torch.float32:
        buffer = torch.empty((rows, vocab_shard), dtype=torch.float32, device=logits2d.device)
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        x = grad[start:end] if buffer is None else buffer[: end - start]
        torch.sub(logits2d[start:end], lse[start:end].unsqueeze(-1), out=x)
        x.exp_().mul_(-g[start:end].unsqueeze(-1))
        x.scatter_add_(1, local_target[start:end].unsqueeze(1), g_target[start:end].unsqueeze(1))
        if buffer is not None:
            grad[start:end].copy_(x)
    return grad


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels, tp_group, ignore_index, chunk_size):
        logps, lse = _forward(logits2d, labels, tp_group, ignore_index, chunk_size)
        ctx.save_for_backward(logits2d, labels, lse)
        ctx.tp_group, ctx.ignore_index, ctx.chunk_size = tp_group, ignore_index, chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        logits2d, labels, lse = ctx.saved_tensors
        grad = _backward(grad_logps, logits2d, labels, lse, ctx.tp_group, ctx.ignore_index,
                         ctx.chunk_size)
        return grad, None, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    tp_group: Optional[ProcessGroup] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Per-token log-probs of ``labels`` under vocab-parallel ``logits``.

    Args:
        logits: [batch, seq, vocab/TP] (any leading dims), any float dtype: this rank's
            contiguous vocabulary block, as megatron-core's output layer shards it. A
            non-contiguous tensor is copied once.
        labels: [batch, seq] global token ids, already shifted (label t is read from
            logits at t); positions equal to ``ignore_index`` are skipped.
        tp_group: the tensor-parallel group the vocabulary is split over; None: no split
            (the full vocabulary is here).
        ignore_index: label value of positions that get log-prob 0 and no gradient.
        chunk_size: tokens per float32 chunk; None picks about 4 MiB on a CPU and 64 MiB on
            a GPU. A value at least the number of tokens runs as one chunk.
    Returns:
        float32 [batch, seq], log p(label), 0 where ``labels == ignore_index``. Under
        ``torch.no_grad()`` (or for logits that need no grad) nothing is kept for backward.
    Raises:
        ValueError: mismatched shapes, or a label outside the global vocabulary that is not
            ``ignore_index``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} must "
                         "agree in every dimension but the last (vocab shard)")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    logits2d = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if torch.is_grad_enabled() and logits.requires_grad:
        logps = _VocabParallelLogProbs.apply(logits2d, flat_labels, tp_group, ignore_index,
                                             chunk_size)
    else:
        logps, _ = _forward(logits2d, flat_labels, tp_group, ignore_index, chunk_size)
    return logps.view(labels.shape)


# --------------------------------------------------------------------------- sequence sums


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the backward is the adjoint, the sum of the incoming gradients.

    Written out because torch.distributed.nn.functional.all_reduce, which does the same, is
    deprecated. When every rank computes the same loss from the sums, each rank's shard
    receives group-size times its single-process gradient; megatron-core's schedule divides
    by the token (pair) count summed over data and context parallel ranks, which cancels it.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Differentiable sum over ``group`` (identity for None or a group of one)."""
    if group_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


def sequence_sums(
    values: Tensor,
    *,
    cp_group: Optional[ProcessGroup] = None,
    segment_ids: Optional[Tensor] = None,
    num_segments: Optional[int] = None,
) -> Tensor:
    """Per-sequence sums of several per-token channels, in one CP all-reduce.

    Args:
        values: [C, batch, seq_shard] float: C per-token channels, already masked.
        cp_group, segment_ids, num_segments: as for ``sequence_logprobs``.
    Returns:
        [C, batch or num_segments] float32, differentiable, equal on every rank of
        ``cp_group`` and equal to the unsharded sums.
    """
    values = values.float()
    if segment_ids is None:
        stats = values.sum(dim=-1)
    else:
        if segment_ids.shape != values.shape[1:] or num_segments is None:
            raise ValueError(f"segment_ids {list(segment_ids.shape)} must be shaped like "
                             f"the per-token values {list(values.shape[1:])}, with "
                             "num_segments")
        # Padding carries mask 0, so sending it to segment 0 adds nothing there.
        index = segment_ids.reshape(-1).clamp(min=0)
        channels = values.shape[0]
        stats = values.new_zeros(channels, num_segments).index_add(
            1, index, values.reshape(channels, -1))
    return all_reduce_sum(stats, cp_group)


def sequence_logprobs(
    token_logps: Tensor,
    loss_mask: Tensor,
    *,
    cp_group: Optional[ProcessGroup] = None,
    segment_ids: Optional[Tensor] = None,
    num_segments: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-sequence sums of response-token log-probs and response-token counts.

    Args:
        token_logps: [batch, seq_shard] float per-token log-probs (``vocab_parallel_logprobs``).
        loss_mask: [batch, seq_shard], 1 on response tokens, 0 on prompt and padding (bool or
            numeric), sharded exactly like ``token_logps``.
        cp_group: the context-parallel group the sequence is sharded over (any layout,
            megatron-core's load-balanced one and Transformer Engine's per-segment THD split
            included: a sum does not care which tokens a rank holds); None: the whole
            sequence is here.
        segment_ids: packed rows: [batch, seq_shard] long, the sequence (segment) each token
            belongs to, in [0, num_segments), negative on padding; sharded like the rest.
            None: each row is one sequence.
        num_segments: the number of sequences when ``segment_ids`` is given.
    Returns:
        (sums [batch or num_segments] float32, differentiable; counts, float32), equal on
        every rank of ``cp_group`` and equal to the unsharded sums.
    """
    if token_logps.shape != loss_mask.shape or token_logps.dim() != 2:
        raise ValueError(f"token_logps {list(token_logps.shape)} and loss_mask "
                         f"{list(loss_mask.shape)} must both be [batch, seq]")
    mask = loss_mask.to(torch.float32)
    reduced = sequence_sums(torch.stack([token_logps.float() * mask, mask]), cp_group=cp_group,
                            segment_ids=segment_ids, num_segments=num_segments)
    return reduced[0], reduced[1].detach()


def shared_length_tail_mask(loss_mask: Tensor, num_pairs: int,
                            segment_ids: Optional[Tensor] = None) -> Tensor:
    """LD-DPO's tail: 1 on the response tokens that lie beyond the first min(n_w, n_l)
    response tokens of their sequence, n_w and n_l being the response lengths of its pair.

    Computed on a whole (not context-parallel sharded) micro-batch in the chosen-first layout:
    sequence j and sequence j + num_pairs are a pair.

    Args:
        loss_mask: [rows, seq], 1 on response tokens.
        num_pairs: P; the micro-batch holds 2P sequences.
        segment_ids: packed rows: [rows, seq], the sequence of each token (contiguous within
            a row), negative on padding; None: row r is sequence r.
    Returns:
        [rows, seq] float32.
    """
    mask = loss_mask.to(torch.float32).reshape(-1)
    if segment_ids is None:
        rows, length = loss_mask.shape
        sequence = torch.arange(rows, device=mask.device).repeat_interleave(length)
    else:
        sequence = segment_ids.reshape(-1)
    valid = sequence >= 0
    mask = mask * valid
    index = sequence.clamp(min=0)
    lengths = mask.new_zeros(2 * num_pairs).index_add(0, index, mask)
    counted = torch.cumsum(mask, 0)
    # the count before a sequence's first token: the smallest (count - mask) over its tokens
    before = torch.full_like(lengths, float("inf")).scatter_reduce(
        0, index[valid], (counted - mask)[valid], reduce="amin")
    position = counted - before[index]  # 1-based position among the response tokens
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
    return (mask * (position > shared[index])).view(loss_mask.shape)


def vocab_parallel_log_sum_sq_probs(logits: Tensor, *, tp_group: Optional[ProcessGroup] = None,
                                    chunk_size: Optional[int] = None) -> Tensor:
    """log sum_v p_v^2 per token under vocab-parallel logits, no gradient (WPO's weights).

    log sum exp(2 (x - M)) - 2 log sum exp(x - M) with M the token's global maximum: one MAX
    and one SUM all-reduce over ``tp_group``, float32 chunks as in
    ``vocab_parallel_logprobs``.

    Args:
        logits: [..., vocab/TP], this rank's vocabulary block.
    Returns:
        float32 [...], detached.
    """
    with torch.no_grad():
        logits2d = logits.reshape(-1, logits.shape[-1])
        num_rows, vocab_shard = logits2d.shape
        rows = chunk_rows(num_rows, vocab_shard, chunk_size, logits2d.device)
        row_max = torch.empty(num_rows, dtype=torch.float32, device=logits2d.device)
        for start in range(0, num_rows, rows):
            row_max[start: start + rows] = logits2d[start: start + rows].float().amax(-1)
        if group_size(tp_group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sums = torch.empty(2, num_rows, dtype=torch.float32, device=logits2d.device)
        for start in range(0, num_rows, rows):
            x = logits2d[start: start + rows].float() - row_max[start: start + rows, None]
            sums[0, start: start + rows] = x.exp().sum(-1)
            sums[1, start: start + rows] = x.mul_(2.0).exp_().sum(-1)
        if group_size(tp_group) > 1:
            dist.all_reduce(sums, group=tp_group)
        return (sums[1].log() - 2.0 * sums[0].log()).view(logits.shape[:-1])
