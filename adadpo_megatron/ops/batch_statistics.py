"""Statistics of the whole batch that some losses need, reduced over data-parallel ranks.

Most preference losses are per pair. Three are not: ``aot`` and ``aot_unpaired`` (Melnyk et
al. 2024) sort the batch and pair each value with the one of the same rank, and ``bco_pair``
(Jung et al. 2024) subtracts a running mean of the rewards. Each is computed here over the
pairs of every data-parallel rank, so that the loss does not depend on how the pairs are
spread over ranks:

- sorting gathers the (detached) per-pair values of the micro-batch of every data-parallel
  rank, ranks them all, and hands each rank the partner values of its own pairs as
  constants. The per-pair loss then differentiates only this rank's own pairs and needs no
  collective in backward; the sum over ranks is the loss of the gathered batch.
- the running mean is updated once per optimizer step from every reward of the global batch
  (one all-reduce), and the step uses the mean of the steps before it.

Context-parallel ranks hold the same per-pair statistics (the sequence sums are reduced over
CP before the loss), so the gathers run over the data-parallel group without CP.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from adadpo_megatron.ops.logprobs import group_size

Tensor = torch.Tensor


def gather_pairs(values: Tensor, group) -> Tuple[Tensor, int]:
    """All ranks' per-pair values, concatenated in rank order, and where ours start.

    Args:
        values: [C, P] detached, P may differ between ranks (packed micro-batches).
        group: the data-parallel group; None or a group of one gathers nothing.
    Returns:
        ([C, sum of P over ranks], offset of this rank's first pair).
    """
    if group_size(group) == 1:
        return values, 0
    world = dist.get_world_size(group)
    count = torch.tensor([values.shape[1]], dtype=torch.long, device=values.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in torch.cat(counts).tolist()]
    padded = values.new_zeros(values.shape[0], max(sizes))
    padded[:, : values.shape[1]] = values
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    rank = dist.get_rank(group)
    every = torch.cat([piece[:, :size] for piece, size in zip(pieces, sizes, strict=True)], 1)
    return every, sum(sizes[:rank])


def _ranks(values: Tensor) -> Tuple[Tensor, Tensor]:
    """(order, rank): ``values[order]`` is sorted ascending (ties in gathered order), and
    ``rank[i]`` is the position of value i in it."""
    order = torch.sort(values, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return order, rank


def aot_partners(logratios: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, group=None
                 ) -> Tuple[Tensor, Tensor]:
    """AOT (paired): the reference sums of the pair whose reference log-ratio has the rank
    that each of our pairs' policy log-ratio has, over the gathered batch.

    TRL's aot sorts pi_w - pi_l and ref_w - ref_l separately and subtracts them rank by
    rank; a pair of policy rank k meets ref_w' - ref_l' of reference rank k.

    Args:
        logratios: [P] pi_w - pi_l, this rank's pairs.
        ref_chosen, ref_rejected: [P] their reference sums.
        group: the data-parallel group.
    Returns:
        (ref_w', ref_l'), [P] each, detached.
    """
    local = torch.stack([logratios, ref_chosen, ref_rejected]).detach()
    every, offset = gather_pairs(local, group)
    _, policy_rank = _ranks(every[0])
    ref_order, _ = _ranks(every[1] - every[2])
    partner = ref_order[policy_rank[offset: offset + local.shape[1]]]
    return every[1, partner], every[2, partner]


def unpaired_partners(chosen: Tensor, rejected: Tensor, group=None) -> Tuple[Tensor, Tensor]:
    """AOT (unpaired): chosen and rejected log-ratios are sorted separately and the k-th of
    one meets the k-th of the other.

    Args:
        chosen, rejected: [P] this rank's log-ratios rho_w and rho_l.
        group: the data-parallel group.
    Returns:
        (the rejected value at our chosen's rank, the chosen value at our rejected's rank),
        [P] each, detached.
    """
    local = torch.stack([chosen, rejected]).detach()
    every, offset = gather_pairs(local, group)
    chosen_order, chosen_rank = _ranks(every[0])
    rejected_order, rejected_rank = _ranks(every[1])
    mine = slice(offset, offset + local.shape[1])
    return (every[1, rejected_order[chosen_rank[mine]]],
            every[0, chosen_order[rejected_rank[mine]]])


class RewardRunningMean:
    """bco_pair's delta: the mean of every implicit reward (chosen and rejected) of the
    optimizer steps so far.

    During a step the loss reads ``delta`` (the mean of the earlier steps; 0 before the
    first) and adds its micro-batch's rewards to a pending sum on the device, without a
    sync. ``commit`` folds the step's pending sum in with one all-reduce over the ranks that
    computed losses. Reading the earlier steps' mean rather than a mean updated micro-batch
    by micro-batch (as TRL before 1.0 did) makes every pair of a step see the same delta
    whatever the micro-batch size or data-parallel layout. Saved in checkpoints.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0.0
        self._pending: Optional[Tensor] = None

    def delta(self, like: Tensor) -> Tensor:
        return torch.tensor(self.mean, dtype=like.dtype, device=like.device)

    def accumulate(self, rewards: Tensor) -> None:
        """Adds rewards [any shape] (detached) to this step's pending sum."""
        part = torch.stack([rewards.detach().double().sum(),
                            torch.tensor(float(rewards.numel()), dtype=torch.float64,
                                         device=rewards.device)])
        self._pending = part if self._pending is None else self._pending + part

    def discard(self) -> None:
        """Forgets the pending sum (an evaluation, or a step that was not taken)."""
        self._pending = None

    def commit(self, group=None, replicas: int = 1, device=None) -> None:
        """Folds the pending sum in: summed over ``group`` (every rank calls this; ranks that
        computed no loss add zeros) and divided by ``replicas``, the number of ranks that
        computed the same pairs (tensor- times context-parallel size)."""
        pending = self._pending
        if pending is None:
            pending = torch.zeros(2, dtype=torch.float64, device=device)
        if group_size(group) > 1 or (group is None and dist.is_available()
                                     and dist.is_initialized()):
            pending = pending.clone()
            dist.all_reduce(pending, group=group)
        total, count = (pending / replicas).tolist()
        if count > 0:
            self.mean = (self.mean * self.count + total) / (self.count + count)
            self.count += count
        self._pending = None

    def state_dict(self) -> Dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])
