"""sequence_logprobs on 2 context-parallel ranks against the unsharded sums."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from adadpo_megatron.ops.logprobs import sequence_logprobs
from tests.support.distributed import run_distributed

B, S = 3, 16


def global_problem():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(B, S, generator=g, dtype=torch.float64).float()
    loss_mask = torch.zeros(B, S)
    loss_mask[0, 5:12] = 1
    loss_mask[1, 1:] = 1
    loss_mask[2, 15] = 1
    weights = torch.randn(B, generator=g)
    return token_logps, loss_mask, weights


def loss_of(sums, counts, weights):
    """Any nonlinear function of whole-sequence statistics, the same on every rank."""
    return ((sums / counts) * weights).exp().sum()


def _cp_worker(rank, world):
    from megatron.core.utils import get_batch_on_this_cp_rank

    token_logps, loss_mask, weights = global_problem()
    full = token_logps.clone().requires_grad_()
    ref_sums, ref_counts = (full * loss_mask).sum(-1), loss_mask.sum(-1)
    loss_of(ref_sums, ref_counts, weights).backward()

    held = torch.arange(S).expand(B, S)
    x = token_logps.clone().requires_grad_()
    # megatron-core's load-balanced sharding: chunks (r, 2 * cp - 1 - r) of 2 * cp
    shard = get_batch_on_this_cp_rank(
        {"token_logps": x, "loss_mask": loss_mask, "positions": held},
        is_hybrid_cp=False, cp_group=dist.group.WORLD)
    assert shard["token_logps"].shape == (B, S // world)
    sums, counts = sequence_logprobs(shard["token_logps"], shard["loss_mask"],
                                     cp_group=dist.group.WORLD)
    torch.testing.assert_close(sums, ref_sums.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(counts, ref_counts)
    loss_of(sums, counts, weights).backward()

    # The all-reduce's backward is the adjoint: every rank's identical loss reaches every
    # shard, so a rank's positions receive world x the single-process gradient, others 0.
    mine = torch.zeros(B, S, dtype=torch.bool)
    mine[:, shard["positions"][0]] = True
    torch.testing.assert_close(x.grad[mine], world * full.grad[mine], rtol=1e-6, atol=1e-7)
    assert (x.grad[~mine] == 0).all()
    # Summed over ranks, as data-and-context-parallel gradient reduction does, it is world x.
    total = x.grad.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, world * full.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_cp2_sums_match_unsharded():
    run_distributed(_cp_worker, 2)


def test_single_process_sums():
    token_logps, loss_mask, _ = global_problem()
    sums, counts = sequence_logprobs(token_logps, loss_mask.bool())
    expected = [sum(float(token_logps[b, t]) for t in range(S) if loss_mask[b, t])
                for b in range(B)]
    torch.testing.assert_close(sums, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(counts, torch.tensor([7.0, 15.0, 1.0]))
