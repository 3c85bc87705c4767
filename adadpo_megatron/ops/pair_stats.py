"""The per-pair statistics every loss reads, and what it reads from the rest of the batch.

Shapes are [P], one value per pair, in one float dtype (>= float32): whole-sequence sums of
response-token log-probs and response-token counts, already reduced over tensor- and
context-parallel ranks (adadpo_megatron.ops.logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class PairStats:
    """Per-pair sequence statistics, each of shape [P], in one float dtype (>= float32).

    ``*_logps`` are sums of response-token log-probs, ``*_lengths`` response-token counts
    (> 0). ``ref_*`` are the same sums under the frozen reference, or None.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Optional[Tensor] = None
    ref_rejected_logps: Optional[Tensor] = None

    @property
    def chosen_mean(self) -> Tensor:
        return self.chosen_logps / self.chosen_lengths

    @property
    def rejected_mean(self) -> Tensor:
        return self.rejected_logps / self.rejected_lengths

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None

    @property
    def chosen_rho(self) -> Tensor:
        """Log-ratio to the reference (the log-prob itself for reference-free losses)."""
        if self.has_reference:
            return self.chosen_logps - self.ref_chosen_logps
        return self.chosen_logps

    @property
    def rejected_rho(self) -> Tensor:
        if self.has_reference:
            return self.rejected_logps - self.ref_rejected_logps
        return self.rejected_logps


@dataclass(frozen=True)
class LengthTails:
    """LD-DPO's split of each response: the log-prob sums and token counts, [P] each, of the
    response tokens beyond the shorter response of the pair (min(n_w, n_l) tokens)."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


def length_desensitised(stats: PairStats, tails: LengthTails, alpha: float) -> PairStats:
    """LD-DPO (Liu et al. 2024): each sum becomes shared + alpha * tail, and each count the
    matching n_shared + alpha * n_tail, so that means stay per-token means. The reference
    sums in ``stats`` are already weighted (the reference forward step does it)."""
    k = 1.0 - alpha
    return replace(stats,
                   chosen_logps=stats.chosen_logps - k * tails.chosen_logps,
                   rejected_logps=stats.rejected_logps - k * tails.rejected_logps,
                   chosen_lengths=stats.chosen_lengths - k * tails.chosen_lengths,
                   rejected_lengths=stats.rejected_lengths - k * tails.rejected_lengths)


@dataclass(frozen=True)
class BatchContext:
    """What a loss reads from the rest of the batch, fixed before the per-pair terms run
    (constants to autograd). Each field [P] unless stated, None where no loss needs it.

    Fields:
        bco_delta: 0-dim, bco_pair's running reward mean.
        aot_ref_chosen, aot_ref_rejected: the reference sums of each pair's AOT partner.
        unpaired_rejected: the rejected log-ratio sorted to our chosen's rank (aot_unpaired).
        unpaired_chosen: the chosen log-ratio sorted to our rejected's rank (aot_unpaired).
    """

    bco_delta: Optional[Tensor] = None
    aot_ref_chosen: Optional[Tensor] = None
    aot_ref_rejected: Optional[Tensor] = None
    unpaired_rejected: Optional[Tensor] = None
    unpaired_chosen: Optional[Tensor] = None
