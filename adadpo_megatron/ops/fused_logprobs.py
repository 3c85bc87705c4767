"""Per-token log-probs straight from the last hidden states: the logits never exist whole.

``fused_hidden_logprobs`` multiplies chunks of tokens with this rank's output-weight shard,
reduces each chunk to a vocab-shard log-sum-exp and target logit, and combines them over the
tensor-parallel group exactly as ``vocab_parallel_logprobs`` does. The backward recomputes the
chunk's logits and gives the gradient of the hidden states (this rank's partial sum over its
vocab shard; megatron-core's region functions reduce it over TP) and of the weight shard. The
memory beyond the inputs and their gradients is one float32 chunk of [tokens, vocab/TP]
instead of the [batch, seq, vocab/TP] logits and their gradient.

``adadpo_megatron.mcore.forward_step.LogProbOutputProcessor`` plugs it into GPTModel through
megatron-core's ``output_processor`` hook.
"""

from __future__ import annotations

from typing import Optional

import torch

from adadpo_megatron.ops.logprobs import (
    check_labels,
    chunk_rows,
    combine_over_tp,
    group_size,
    row_scales,
    token_targets,
)

Tensor = torch.Tensor


class _FusedHiddenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, ignore_index, chunk_size):
        num_rows, vocab_shard = hidden.shape[0], weight.shape[0]
        ignored, owned, local_target = token_targets(labels, vocab_shard, tp_group, ignore_index)
        check_labels(labels, ignored, vocab_shard * group_size(tp_group), ignore_index)
        rows = chunk_rows(num_rows, vocab_shard, chunk_size, hidden.device)
        local_lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        target = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, num_rows, rows):
            end = min(start + rows, num_rows)
            logits = (hidden[start:end] @ weight.t()).float()
            target[start:end] = logits.gather(1, local_target[start:end, None]).squeeze(1)
            local_lse[start:end] = torch.logsumexp(logits, dim=-1)
        logps, lse = combine_over_tp(local_lse, target, owned, ignored, tp_group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.ignore_index, ctx.chunk_size = tp_group, ignore_index, chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, labels, lse = ctx.saved_tensors
        num_rows, vocab_shard = hidden.shape[0], weight.shape[0]
        ignored, owned, local_target = token_targets(labels, vocab_shard, ctx.tp_group,
                                                ctx.ignore_index)
        g, g_target = row_scales(grad_logps, ignored, owned)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        rows = chunk_rows(num_rows, vocab_shard, ctx.chunk_size, hidden.device)
        for start in range(0, num_rows, rows):
            end = min(start + rows, num_rows)
            # d logp / d logits = onehot(label) - softmax, scaled per row
            d_logits = (hidden[start:end] @ weight.t()).float()
            d_logits.sub_(lse[start:end, None]).exp_().mul_(-g[start:end, None])
            d_logits.scatter_add_(1, local_target[start:end, None], g_target[start:end, None])
            d_logits = d_logits.to(hidden.dtype)
            grad_hidden[start:end] = d_logits @ weight
            grad_weight.add_(d_logits.t().float() @ hidden[start:end].float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def fused_hidden_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                          tp_group=None, ignore_index: int = -100,
                          chunk_size: Optional[int] = None) -> Tensor:
    """log p(label) from hidden states and this rank's output-weight shard.

    Args:
        hidden: [N, h] the full-sequence hidden states every TP rank holds (gathered from
            sequence parallelism, if on, by the caller).
        weight: [V/TP, h] this rank's contiguous vocab block of the output layer.
        labels: [N] global token ids; ``ignore_index`` positions give 0 and no gradient.
        tp_group: the tensor-parallel group (None: no split).
        chunk_size: tokens per chunk (None: about 4 MiB of float32 logits on CPU, 64 on GPU).
    Returns:
        float32 [N]. The gradient reaching ``hidden`` is this rank's partial sum over its
        vocab shard, to be summed over TP (megatron-core's region functions do it).
    """
    return _FusedHiddenLogProbs.apply(hidden, weight, labels.reshape(-1).long(), tp_group,
                                      ignore_index, chunk_size)
