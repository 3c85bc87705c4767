"""Every loss type, one record each: its term, and the traits the rest of the code reads.

Adding a loss is one function in adadpo_megatron.ops.loss_terms and one entry in LOSS_TABLE;
the config's checks (loss_config), the coefficient, the metrics (loss) and the forward step
read the traits from here, never the loss's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from adadpo_megatron.ops import loss_terms as t
from adadpo_megatron.ops.batch_statistics import (
    RewardRunningMean,
    aot_partners,
    unpaired_partners,
)
from adadpo_megatron.ops.pair_stats import PairStats

# What a loss reads from the rest of the batch: (stats, config, data-parallel group, running
# mean) -> BatchContext fields. Computed before the per-pair terms, constants to autograd.
BatchReader = Callable[[PairStats, t.LossSettings, object, Optional[RewardRunningMean]], Dict]


def _running_mean(stats, config, group, running_mean):
    return {"bco_delta": (running_mean.delta(stats.chosen_logps)
                          if config.bco_running_mean and running_mean is not None
                          else stats.chosen_logps.new_zeros(()))}


def _aot_partners(stats, config, group, running_mean):
    chosen, rejected = aot_partners(stats.chosen_logps - stats.rejected_logps,
                                    stats.ref_chosen_logps, stats.ref_rejected_logps, group)
    return {"aot_ref_chosen": chosen, "aot_ref_rejected": rejected}


def _unpaired_partners(stats, config, group, running_mean):
    rejected, chosen = unpaired_partners(stats.chosen_rho, stats.rejected_rho, group)
    return {"unpaired_rejected": rejected, "unpaired_chosen": chosen}


@dataclass(frozen=True)
class LossType:
    """One loss type (docs/LOSSES.md has its formula and paper).

    Fields:
        term: the per-pair loss (adadpo_megatron.ops.loss_terms), None for "sft" (the chosen
            responses' NLL, which the loss adds itself).
        reward: its implicit reward, which rewards/* and the accuracy are read in.
        reference_free: it reads no reference log-probs (its rho is the log-prob itself).
        mean_scored: its score is a per-token mean log-prob or log-ratio, not a sum (the
            measured gradient balance then converts dL/dm = n dL/dpi).
        odds_scored: its score is a log-odds of the mean log-prob (orpo): the coefficient
            needs the factor (1 - exp(m_w)) / (1 - exp(m_l)) for equal gradients.
        label_smoothed: it takes loss.label_smoothing (conservative DPO, the robust
            estimator's noise rate, or EXO's target distribution).
        needs_label_smoothing: it is undefined without it (exo_pair's target).
        batch: what it reads from the rest of the batch, or None (a per-pair loss).
        sorts_batch: its per-pair loss depends on the other pairs' ranks (aot, aot_unpaired):
            no per-pair weights (WPO) apply.
        updates_running_mean: it folds each step's rewards into a running mean (bco_pair).
        nll_weight: the default weight of the chosen-response NLL term (cpo, orpo: 1).
        balance: "exact" (the loss is a function of the reward difference: AdaDPO balances
            the two gradients exactly), "measured" (separate chosen and rejected terms:
            adadpo/grad_ratio shows it) or "none".
        not_adaptive: why AdaDPO is undefined for it, or None.
    """

    term: Optional[t.PreferenceTerm]
    reward: t.ImplicitReward = t.log_ratio_reward
    reference_free: bool = False
    mean_scored: bool = False
    odds_scored: bool = False
    label_smoothed: bool = False
    needs_label_smoothing: bool = False
    batch: Optional[BatchReader] = None
    sorts_batch: bool = False
    updates_running_mean: bool = False
    nll_weight: float = 0.0
    balance: str = "exact"
    not_adaptive: Optional[str] = None


# In the order of docs/LOSSES.md's table. Aliases (TRL's names for the same loss) follow.
LOSS_TABLE: Dict[str, LossType] = {
    "dpo": LossType(t.dpo, label_smoothed=True),
    "hinge": LossType(t.hinge),
    "ipo": LossType(t.ipo, t.per_token_log_ratio_reward, mean_scored=True),
    "exo_pair": LossType(t.exo_pair, label_smoothed=True, needs_label_smoothing=True),
    "nca_pair": LossType(t.nca_pair, balance="measured"),
    "robust": LossType(t.robust, label_smoothed=True),
    "bco_pair": LossType(t.bco_pair, batch=_running_mean, updates_running_mean=True,
                         balance="measured"),
    "sppo_hard": LossType(t.sppo_hard, balance="measured"),
    "aot": LossType(t.aot, label_smoothed=True, batch=_aot_partners, sorts_batch=True),
    "aot_unpaired": LossType(
        t.aot_unpaired, label_smoothed=True, batch=_unpaired_partners, sorts_batch=True,
        balance="none",
        not_adaptive="it sorts the chosen and the rejected responses separately, so a pair's "
                     "two responses never meet in one term and there is no pair to balance"),
    "apo_zero": LossType(t.apo_zero, balance="measured"),
    "apo_down": LossType(
        t.apo_down, balance="none",
        not_adaptive="it pushes the chosen response down as well (APO Eq. 8), so there is no "
                     "push-up to balance against the push-down"),
    "discopop": LossType(t.discopop),
    "sigmoid_norm": LossType(t.sigmoid_norm, t.per_token_log_ratio_reward, mean_scored=True),
    "simpo": LossType(t.simpo, t.mean_logp_reward, reference_free=True, mean_scored=True,
                      label_smoothed=True),
    "rdpo": LossType(t.rdpo, label_smoothed=True),
    "cpo": LossType(t.cpo, reference_free=True, label_smoothed=True, nll_weight=1.0),
    "orpo": LossType(t.orpo, t.orpo_reward, reference_free=True, mean_scored=True,
                     odds_scored=True, nll_weight=1.0),
    "sft": LossType(None, reference_free=True, balance="none",
                    not_adaptive="it has no rejected response"),
}
ALIASES = {"sigmoid": "dpo"}  # TRL's name for the same loss


def loss_record(name: str) -> LossType:
    """The record of ``name`` (an alias resolved)."""
    return LOSS_TABLE[ALIASES.get(name, name)]


# Views of the table, by name (aliases included), for the config's messages and for tests.
LOSS_TYPES = tuple(name for canonical in LOSS_TABLE
                   for name in (canonical, *[a for a, c in ALIASES.items() if c == canonical]))


def _names(trait: Callable[[LossType], bool]) -> frozenset:
    return frozenset(name for name in LOSS_TYPES if trait(loss_record(name)))


REFERENCE_FREE_LOSS_TYPES = _names(lambda x: x.reference_free)
MEAN_SCORED_LOSS_TYPES = _names(lambda x: x.mean_scored)
LABEL_SMOOTHED_LOSS_TYPES = _names(lambda x: x.label_smoothed)
BATCH_SORTED_LOSS_TYPES = _names(lambda x: x.sorts_batch)
EXACT_BALANCE_LOSS_TYPES = _names(lambda x: x.balance == "exact")
MEASURED_BALANCE_LOSS_TYPES = _names(lambda x: x.balance == "measured")
NOT_ADAPTIVE = {name: loss_record(name).not_adaptive for name in LOSS_TYPES
                if loss_record(name).not_adaptive}
PREFERENCE_TERMS = {name: record.term for name, record in LOSS_TABLE.items()
                    if record.term is not None}
