"""LossConfig: the preference loss (one loss type or a weighted mix) and its AdaDPO coefficient.

The dataclass validates itself in ``__post_init__``: a bad value raises ``ValueError``
naming the config key, the value and what is allowed, before anything is built.

Loss types carry TRL's ``DPOTrainer`` names (TRL 1.16) where TRL has the loss, plus this
project's ``dpo`` (= ``sigmoid``), ``simpo``, ``rdpo``, ``cpo`` and ``orpo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

# the traits of every loss type are one table (adadpo_megatron.ops.loss_types); the names
# below are views of it, importable from here as before (__all__)
from adadpo_megatron.ops.loss_types import (
    ALIASES,
    BATCH_SORTED_LOSS_TYPES,
    EXACT_BALANCE_LOSS_TYPES,
    LABEL_SMOOTHED_LOSS_TYPES,
    LOSS_TYPES,
    MEAN_SCORED_LOSS_TYPES,
    MEASURED_BALANCE_LOSS_TYPES,
    NOT_ADAPTIVE,
    REFERENCE_FREE_LOSS_TYPES,
    loss_record,
)
from adadpo_megatron.validation import require_choice, require_number

COEFFICIENT_SPACES = ("policy", "ratio")
COEFFICIENT_REDUCTIONS = ("mean", "sum")
NLL_REDUCTIONS = ("pair", "token")


@dataclass
class LossConfig:
    """The preference loss and its AdaDPO coefficient (docs/LOSSES.md; arXiv 2605.28440).

    Fields:
        loss_type: one loss type, or a list of them summed with ``loss_weights`` (TRL's MPO
            usage, e.g. [sigmoid, bco_pair, sft]). See LOSS_TYPES and docs/LOSSES.md:
            "dpo"/"sigmoid" (Rafailov et al. 2023), "hinge" (SLiC, Zhao et al. 2023), "ipo"
            (Azar et al. 2023), "exo_pair" (Ji et al. 2024), "nca_pair" (Chen et al. 2024),
            "robust" (Chowdhury et al. 2024), "bco_pair" (Jung et al. 2024), "sppo_hard"
            (Wu et al. 2024), "aot"/"aot_unpaired" (Melnyk et al. 2024), "apo_zero"/"apo_down"
            (D'Oosterlinck et al. 2024), "discopop" (Chris Lu et al. 2024), "sigmoid_norm"
            (DPO on per-token log-ratios), "simpo" (Meng et al. 2024), "rdpo" (Park et al.
            2024), "cpo" (Xu et al. 2024), "orpo" (Hong et al. 2024), "sft" (the chosen
            responses' NLL).
        loss_weights: one weight >= 0 per loss type; None means 1.0 each.
        beta: inverse temperature of the implicit reward, > 0. The paper's grid is
            {0.005, 0.01, 0.05, 0.1}. For "ipo" and "sppo_hard" it is tau, the target margin
            being 1/(2 beta). Unused by "orpo" and "sft".
        adaptive: AdaDPO on (the preferred side is scaled by the stop-gradient coefficient
            w) or off (w = 1, the plain loss).
        clip: the ceiling C on the coefficient, in (0, inf]; the paper's default 2.0,
            stable for C in [1.5, 2.5].
        coefficient_space: "policy" takes the ratio of policy probabilities; "ratio" divides
            it by the same ratio under the reference (needs a reference).
        coefficient_reduction: "mean" (Stable AdaDPO, per-token geometric-mean
            probabilities) or "sum" (whole-sequence probabilities).
        gradient_ratio: the target ratio k = |grad_w| / |grad_l|, > 0; the paper fixes 1.
        label_smoothing: eps in [0, 0.5): conservative DPO for dpo, simpo, rdpo, cpo, aot
            and aot_unpaired; the robust estimator's noise rate for robust; EXO's target
            (1 - eps, eps) for exo_pair, which needs eps > 0.
        simpo_gamma: SimPO's target reward margin gamma (finite).
        rdpo_alpha: R-DPO's length weight alpha, >= 0: the score gains alpha (n_w - n_l)
            (Park et al. 2024: the reward is beta * rho + alpha * |y|).
        nll_weight: weight of the chosen-response NLL term added to the loss, >= 0; None
            means the loss type's own default: 1.0 when the mix has cpo or orpo, 0 otherwise.
        nll_reduction: how the NLL term and "sft" average: "pair" (the mean log-prob of each
            chosen response, then the mean over pairs: every pair counts the same) or "token"
            (TRL's convention: the mean over all chosen tokens of the micro-batch).
        orpo_lambda: ORPO's weight lambda on the odds-ratio term, >= 0 (TRL's ORPO "beta").
        discopop_tau: DiscoPOP's temperature of the logistic/exponential blend, > 0 (TRL's
            default 0.05).
        bco_running_mean: bco_pair subtracts the running mean delta of the rewards (Jung et
            al. 2024; TRL before 1.0), updated once per optimizer step from every reward of
            the global batch; false uses delta = 0, as TRL 1.x does.
        use_weighting: WPO (Zhou et al. 2024): each pair's loss is multiplied by the
            detached weights exp(mean over the response of log p - log sum_v p_v^2) of its
            two responses, as TRL computes them.
        ld_alpha: LD-DPO (Liu et al. 2024) in [0, 1], or None: every log-prob sum becomes the
            sum over the first min(n_w, n_l) response tokens plus ld_alpha times the sum over
            the rest, for the policy and the reference alike.
    """

    loss_type: Union[str, List[str]] = "dpo"
    loss_weights: Optional[List[float]] = None
    beta: float = 0.1
    adaptive: bool = True
    clip: float = 2.0
    coefficient_space: str = "policy"
    coefficient_reduction: str = "mean"
    gradient_ratio: float = 1.0
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rdpo_alpha: float = 0.0
    nll_weight: Optional[float] = None
    nll_reduction: str = "pair"
    orpo_lambda: float = 0.1
    discopop_tau: float = 0.05
    bco_running_mean: bool = True
    use_weighting: bool = False
    ld_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        prefix = "loss."
        types = self.loss_types
        for name in types:
            require_choice(prefix + "loss_type", name, LOSS_TYPES)
        canonical = [ALIASES.get(t, t) for t in types]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"{prefix}loss_type={list(types)!r} names a loss twice "
                             "(sigmoid and dpo are the same loss)")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, (list, tuple)) or \
                    len(self.loss_weights) != len(types):
                raise ValueError(f"{prefix}loss_weights={self.loss_weights!r} must be a list of "
                                 f"{len(types)} number(s), one per loss type {list(types)}")
            for i, weight in enumerate(self.loss_weights):
                require_number(f"{prefix}loss_weights[{i}]", weight, low=0.0)
        require_number(prefix + "beta", self.beta, low=0.0, low_open=True)
        for key in ("adaptive", "bco_running_mean", "use_weighting"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{prefix}{key}={getattr(self, key)!r} must be true or false")
        require_number(prefix + "clip", self.clip, low=0.0, low_open=True, allow_inf=True)
        require_choice(prefix + "coefficient_space", self.coefficient_space, COEFFICIENT_SPACES)
        require_choice(
            prefix + "coefficient_reduction", self.coefficient_reduction, COEFFICIENT_REDUCTIONS
        )
        require_number(prefix + "gradient_ratio", self.gradient_ratio, low=0.0, low_open=True)
        require_number(prefix + "label_smoothing", self.label_smoothing, low=0.0, high=0.5,
                       high_open=True)
        require_number(prefix + "simpo_gamma", self.simpo_gamma)
        require_number(prefix + "rdpo_alpha", self.rdpo_alpha, low=0.0)
        if self.nll_weight is not None:
            require_number(prefix + "nll_weight", self.nll_weight, low=0.0)
        require_choice(prefix + "nll_reduction", self.nll_reduction, NLL_REDUCTIONS)
        require_number(prefix + "orpo_lambda", self.orpo_lambda, low=0.0)
        require_number(prefix + "discopop_tau", self.discopop_tau, low=0.0, low_open=True)
        if self.ld_alpha is not None:
            require_number(prefix + "ld_alpha", self.ld_alpha, low=0.0, high=1.0)
        self._check_combinations(prefix, types)

    def _check_combinations(self, prefix: str, types: Tuple[str, ...]) -> None:
        preference = [t for t in types if loss_record(t).term is not None]  # all but sft
        if self.label_smoothing:
            plain = [t for t in preference if not loss_record(t).label_smoothed]
            if plain:
                raise ValueError(
                    f"{prefix}label_smoothing={self.label_smoothing!r} does not apply to "
                    f"loss_type {plain[0]!r}; it applies to {sorted(LABEL_SMOOTHED_LOSS_TYPES)}")
        else:
            needing = [t for t in types if loss_record(t).needs_label_smoothing]
            if needing:
                raise ValueError(f"{prefix}loss_type {needing[0]!r} needs label_smoothing > 0 "
                                 "(its target distribution is (1 - eps, eps); TRL suggests "
                                 "1e-3)")
        if self.adaptive:
            refused = [t for t in preference if loss_record(t).not_adaptive]
            if refused:
                raise ValueError(f"{prefix}adaptive=true is not defined for loss_type "
                                 f"{refused[0]!r}: {NOT_ADAPTIVE[refused[0]]}; set "
                                 f"{prefix}adaptive=false")
            if not preference:
                raise ValueError(f"{prefix}adaptive=true needs a preference loss, and loss_type "
                                 f"{types[0]!r} has none ({NOT_ADAPTIVE[types[0]]}); set "
                                 f"{prefix}adaptive=false")
        if self.coefficient_space == "ratio" and not self.needs_reference:
            raise ValueError(
                f"{prefix}coefficient_space='ratio' needs a reference model, but "
                f"loss_type={self.loss_type!r} is reference-free; use coefficient_space='policy'"
            )
        odds = [t for t in types if loss_record(t).odds_scored]
        if odds and self.coefficient_reduction == "sum":
            raise ValueError(
                f"{prefix}coefficient_reduction='sum' is not defined for loss_type={odds[0]!r}, "
                "whose score is the log-odds of the mean log-prob; use "
                "coefficient_reduction='mean'"
            )
        if self.use_weighting and self.sorts_batch:
            raise ValueError(f"{prefix}use_weighting=true is not defined for "
                             f"{', '.join(sorted(BATCH_SORTED_LOSS_TYPES))}, which sort the "
                             "pairs (each pair's weight would land on another pair's term)")

    @property
    def loss_types(self) -> Tuple[str, ...]:
        """The loss types as a tuple, as the user named them."""
        if isinstance(self.loss_type, str):
            return (self.loss_type,)
        if isinstance(self.loss_type, (list, tuple)) and self.loss_type:
            return tuple(self.loss_type)
        raise ValueError(f"loss.loss_type={self.loss_type!r} must be a loss type or a "
                         f"non-empty list of them; choose from {', '.join(LOSS_TYPES)}")

    @property
    def terms(self) -> Tuple[Tuple[str, float], ...]:
        """((canonical loss type, weight), ...): "sigmoid" is "dpo"."""
        weights = self.loss_weights or [1.0] * len(self.loss_types)
        return tuple((ALIASES.get(t, t), float(w))
                     for t, w in zip(self.loss_types, weights, strict=True))

    @property
    def sorts_batch(self) -> bool:
        """Whether a loss of the mix sorts the batch over data-parallel ranks (aot,
        aot_unpaired): the forward step then hands it the data-parallel group."""
        return any(loss_record(t).sorts_batch for t, _ in self.terms)

    @property
    def updates_running_mean(self) -> bool:
        """Whether a loss of the mix keeps a running reward mean (bco_pair), which the
        forward step folds each step's rewards into."""
        return any(loss_record(t).updates_running_mean for t, _ in self.terms)

    @property
    def primary_type(self) -> str:
        """The first preference loss type (not "sft"): the one rewards/* and
        adadpo/grad_ratio are read in. "sft" when the mix has nothing else."""
        return next((name for name, _ in self.terms if loss_record(name).term is not None),
                    self.terms[0][0])

    def check_fused_logprobs(self, fused: bool) -> None:
        """Raises if the loss cannot run on fused log-probs (model.fused_logprobs), which
        never materialise the logits: WPO reads log sum_v p_v^2 from them."""
        if fused and self.use_weighting:
            raise ValueError("loss.use_weighting=true (WPO) reads log sum_v p_v^2 from the "
                             "logits, which model.fused_logprobs=true never materialises; "
                             "set model.fused_logprobs=false")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        return any(not loss_record(t).reference_free for t, _ in self.terms)

    @property
    def sft_weight(self) -> float:
        """The weight of "sft" (the loss type with no preference term) in the mix, 0 without."""
        return sum(weight for name, weight in self.terms if loss_record(name).term is None)

    @property
    def has_nll_term(self) -> bool:
        """Whether the loss has the chosen responses' NLL in it: an NLL term or sft."""
        return self.effective_nll_weight > 0 or any(
            loss_record(name).term is None for name, _ in self.terms)

    @property
    def token_mean_per_micro_batch(self) -> bool:
        """Whether the loss averages over the tokens of each micro-batch (nll_reduction
        "token" with an NLL term or sft, TRL's convention): its value then depends on which
        pairs share a micro-batch (micro-batch size, packing, data-parallel size)."""
        return self.nll_reduction == "token" and self.has_nll_term

    @property
    def effective_nll_weight(self) -> float:
        """``nll_weight`` with None resolved to the loss type's default."""
        if self.nll_weight is not None:
            return float(self.nll_weight)
        return max(loss_record(t).nll_weight for t, _ in self.terms)


__all__ = ["ALIASES", "BATCH_SORTED_LOSS_TYPES", "COEFFICIENT_REDUCTIONS", "COEFFICIENT_SPACES",
           "EXACT_BALANCE_LOSS_TYPES", "LABEL_SMOOTHED_LOSS_TYPES", "LOSS_TYPES",
           "MEAN_SCORED_LOSS_TYPES", "MEASURED_BALANCE_LOSS_TYPES", "NLL_REDUCTIONS",
           "NOT_ADAPTIVE", "REFERENCE_FREE_LOSS_TYPES", "LossConfig"]
