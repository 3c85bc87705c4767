"""LossConfig: the preference loss and its AdaDPO coefficient.

The dataclass validates itself in ``__post_init__``: a bad value raises ``ValueError``
naming the config key, the value and what is allowed, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from adadpo_megatron.validation import require_choice, require_number

LOSS_TYPES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo")
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo"})
# Losses whose score is a length-normalised (per-token) quantity rather than a sum.
MEAN_SCORED_LOSS_TYPES = frozenset({"simpo", "ipo", "orpo"})
SIGMOID_LOSS_TYPES = frozenset({"dpo", "simpo", "rdpo", "cpo"})
COEFFICIENT_SPACES = ("policy", "ratio")
COEFFICIENT_REDUCTIONS = ("mean", "sum")


@dataclass
class LossConfig:
    """The preference loss and its AdaDPO coefficient (see ADADPO.md, arXiv 2605.28440).

    Fields:
        loss_type: pairwise loss; "dpo" (Rafailov et al. 2023), "ipo" (Azar et al. 2023),
            "simpo" (Meng et al. 2024, reference-free), "rdpo" (Park et al. 2024),
            "cpo" (Xu et al. 2024, reference-free), "orpo" (Hong et al. 2024, reference-free).
        beta: inverse temperature of the implicit reward, > 0. The paper's grid is
            {0.005, 0.01, 0.05, 0.1}. For "ipo" it is tau, the target margin being 1/(2 beta).
            Unused by "orpo".
        adaptive: AdaDPO on (the preferred side is scaled by the stop-gradient coefficient
            w) or off (w = 1, the plain loss).
        clip: the ceiling C on the coefficient, in (0, inf]; the paper's default 2.0,
            stable for C in [1.5, 2.5].
        coefficient_space: "policy" takes the ratio of policy probabilities; "ratio" divides
            it by the same ratio under the reference (needs a reference).
        coefficient_reduction: "mean" (Stable AdaDPO, per-token geometric-mean
            probabilities) or "sum" (whole-sequence probabilities).
        gradient_ratio: the target ratio k = |grad_w| / |grad_l|, > 0; the paper fixes 1.
        label_smoothing: eps in [0, 0.5), the conservative-DPO smoothing of the sigmoid
            losses (dpo, simpo, rdpo, cpo).
        simpo_gamma: SimPO's target reward margin gamma (finite).
        rdpo_alpha: R-DPO's length weight alpha, >= 0: the score gains alpha (n_w - n_l)
            (Park et al. 2024: the reward is beta * rho + alpha * |y|).
        nll_weight: weight of the chosen-response NLL term (-m_w) added to the loss, >= 0;
            None means the loss type's own default: 1.0 for cpo and orpo, 0 otherwise.
        orpo_lambda: ORPO's weight lambda on the odds-ratio term, >= 0.
    """

    loss_type: str = "dpo"
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
    orpo_lambda: float = 0.1

    def __post_init__(self) -> None:
        prefix = "loss."
        require_choice(prefix + "loss_type", self.loss_type, LOSS_TYPES)
        require_number(prefix + "beta", self.beta, low=0.0, low_open=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"{prefix}adaptive={self.adaptive!r} must be true or false")
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
        require_number(prefix + "orpo_lambda", self.orpo_lambda, low=0.0)

        if self.label_smoothing and self.loss_type not in SIGMOID_LOSS_TYPES:
            raise ValueError(
                f"{prefix}label_smoothing={self.label_smoothing!r} applies only to the sigmoid "
                f"losses {sorted(SIGMOID_LOSS_TYPES)}, not loss_type={self.loss_type!r}; "
                "set it to 0"
            )
        if self.coefficient_space == "ratio" and not self.needs_reference:
            raise ValueError(
                f"{prefix}coefficient_space='ratio' needs a reference model, but "
                f"loss_type={self.loss_type!r} is reference-free; use coefficient_space='policy'"
            )
        if self.loss_type == "orpo" and self.coefficient_reduction == "sum":
            raise ValueError(
                f"{prefix}coefficient_reduction='sum' is not defined for loss_type='orpo', whose "
                "score is the log-odds of the mean log-prob; use coefficient_reduction='mean'"
            )

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        return self.loss_type not in REFERENCE_FREE_LOSS_TYPES

    @property
    def effective_nll_weight(self) -> float:
        """``nll_weight`` with None resolved to the loss type's default."""
        if self.nll_weight is not None:
            return float(self.nll_weight)
        return 1.0 if self.loss_type in ("cpo", "orpo") else 0.0
