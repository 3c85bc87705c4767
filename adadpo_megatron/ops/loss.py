"""AdaDPO and the pairwise preference losses, on per-pair sequence statistics.

Pure torch: no torch.distributed, no megatron import. The inputs are whole-sequence
statistics (sums of response-token log-probs and response-token counts), already reduced
over tensor- and context-parallel ranks; see ``adadpo_megatron.ops.logprobs``.

The AdaDPO rule (Chen et al., arXiv 2605.28440): scale the preferred side of the loss by
``w = sg(min(k * P_w / P_l, C))`` so that the gradients on the two probabilities have
equal magnitude. With the default reduction "mean" (Stable AdaDPO) the ratio is built from
per-token geometric-mean probabilities ``exp(mean log-prob)``. The exact formulas this
project uses are in ADADPO.md and the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from adadpo_megatron.ops.loss_config import LossConfig

Tensor = torch.Tensor

# ORPO's odds need log(1 - p) with p = exp(m) < 1; mean log-probs are clamped below 0 by this
# much so that an all-certain response (m = 0) gives large but finite odds.
_ORPO_MAX_MEAN_LOGP = -1e-7


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


# --------------------------------------------------------------------------- coefficient


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo_log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with p = exp(mean log-prob): ORPO's score."""
    m = mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    return m - _log1mexp(m)


def coefficient_log_ratio(stats: PairStats, config: LossConfig, *, space: Optional[str] = None
                          ) -> Tensor:
    """log r, the log of the probability ratio the AdaDPO coefficient is built from.

    Reduction "mean": ``m_w - m_l``; "sum": ``pi_w - pi_l``; space "ratio" subtracts the same
    quantity under the reference. For orpo, whose score is a log-odds, equal gradients need
    the extra factor ``(1 - exp(m_w)) / (1 - exp(m_l))``.

    Args:
        stats: per-pair statistics, [P].
        config: the loss configuration.
        space: overrides ``config.coefficient_space`` ("policy" or "ratio").
    Returns:
        [P], in the dtype of ``stats``.
    """
    space = space or config.coefficient_space
    if config.coefficient_reduction == "mean":
        log_r = stats.chosen_mean - stats.rejected_mean
    else:
        log_r = stats.chosen_logps - stats.rejected_logps
    if config.loss_type == "orpo":
        m_w = stats.chosen_mean.clamp(max=_ORPO_MAX_MEAN_LOGP)
        m_l = stats.rejected_mean.clamp(max=_ORPO_MAX_MEAN_LOGP)
        log_r = log_r + _log1mexp(m_w) - _log1mexp(m_l)
    if space == "ratio":
        if config.coefficient_reduction == "mean":
            log_r = log_r - (stats.ref_chosen_logps / stats.chosen_lengths
                             - stats.ref_rejected_logps / stats.rejected_lengths)
        else:
            log_r = log_r - (stats.ref_chosen_logps - stats.ref_rejected_logps)
    return log_r


def adadpo_coefficient(log_ratio: Tensor, *, clip: float = 2.0, gradient_ratio: float = 1.0
                       ) -> Tensor:
    """The AdaDPO coefficient ``w = sg(min(k * r, C))``, computed in log space.

    Args:
        log_ratio: log r per pair, [P] (see ``coefficient_log_ratio``).
        clip: the ceiling C, in (0, inf].
        gradient_ratio: the target gradient ratio k > 0.
    Returns:
        w, [P], detached: the loss never differentiates through it. Finite and >= 0 for any
        finite ``log_ratio`` (exp of at most log C; an underflow gives 0, not NaN).
    """
    log_w = torch.clamp(log_ratio.detach() + math.log(gradient_ratio), max=math.log(clip))
    return torch.exp(log_w)


# --------------------------------------------------------------------------- losses

# Each preference term maps (stats, w, config) to the per-pair loss before the NLL term.
PreferenceTerm = Callable[[PairStats, Tensor, LossConfig], Tensor]


def _sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z), stable for any finite z."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def _dpo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    z = c.beta * (w * s.chosen_rho - s.rejected_rho)
    return _sigmoid_loss(z, c.label_smoothing)


def _ipo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    h = w * s.chosen_rho / s.chosen_lengths - s.rejected_rho / s.rejected_lengths
    return (h - 1.0 / (2.0 * c.beta)) ** 2


def _simpo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    z = c.beta * (w * s.chosen_mean - s.rejected_mean) - c.simpo_gamma
    return _sigmoid_loss(z, c.label_smoothing)


def _rdpo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    # Park et al. 2024: the length-penalised reward is beta * rho + alpha * |y|, so a longer
    # chosen response starts ahead and is pushed less towards length
    z = (c.beta * (w * s.chosen_rho - s.rejected_rho)
         + c.rdpo_alpha * (s.chosen_lengths - s.rejected_lengths))
    return _sigmoid_loss(z, c.label_smoothing)


def _cpo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    z = c.beta * (w * s.chosen_logps - s.rejected_logps)
    return _sigmoid_loss(z, c.label_smoothing)


def _orpo(s: PairStats, w: Tensor, c: LossConfig) -> Tensor:
    z = w * _orpo_log_odds(s.chosen_mean) - _orpo_log_odds(s.rejected_mean)
    return -c.orpo_lambda * F.logsigmoid(z)


PREFERENCE_TERMS: Dict[str, PreferenceTerm] = {
    "dpo": _dpo,
    "ipo": _ipo,
    "simpo": _simpo,
    "rdpo": _rdpo,
    "cpo": _cpo,
    "orpo": _orpo,
}


# --------------------------------------------------------------------------- public entry


def _as_pair_tensor(name: str, value, num_pairs: Optional[int], dtype: torch.dtype) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [P], got {type(value).__name__}")
    if value.dim() != 1 or (num_pairs is not None and value.shape[0] != num_pairs):
        expected = "[P]" if num_pairs is None else f"[{num_pairs}]"
        raise ValueError(f"{name} must have shape {expected} (one value per pair), "
                         f"got {list(value.shape)}")
    return value.to(dtype)


def _check_lengths(name: str, lengths: Tensor) -> None:
    empty = (lengths <= 0).nonzero()
    if empty.numel():
        pair = int(empty[0, 0])
        raise ValueError(
            f"{name}[{pair}] = {lengths[pair].item():g}: the response of pair {pair} has no "
            f"tokens in the loss mask ({empty.numel()} such pairs); an empty response has no "
            "log-probability. Drop the pair or fix its loss mask / truncation."
        )


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    config: LossConfig,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-pair preference losses with the AdaDPO coefficient, and their metrics.

    Args:
        policy_chosen_logps: [P] sum of the policy's log-probs over y_w's response tokens.
        policy_rejected_logps: [P] the same for y_l.
        chosen_lengths: [P] number of response tokens of y_w (> 0), any numeric dtype.
        rejected_lengths: [P] the same for y_l.
        ref_chosen_logps: [P] the reference's sums for y_w; required by dpo, ipo and rdpo,
            refused by the reference-free simpo, cpo and orpo.
        ref_rejected_logps: [P] the same for y_l.
        config: the loss configuration.
    Returns:
        losses: [P] per-pair losses, not reduced, in float32 (float64 inputs stay float64).
        metrics: detached 0-dim tensors named as in TRL and ADADPO.md: means over the pairs,
            except ``adadpo/coef_max`` (max), ``pairs`` and ``tokens`` (counts).
    Raises:
        ValueError: a missing or unexpected reference, mismatched shapes, or an empty
            response (naming the pair index).
    """
    dtype = torch.promote_types(getattr(policy_chosen_logps, "dtype", torch.float32),
                                torch.float32)
    pc = _as_pair_tensor("policy_chosen_logps", policy_chosen_logps, None, dtype)
    num_pairs = pc.shape[0]
    pr = _as_pair_tensor("policy_rejected_logps", policy_rejected_logps, num_pairs, dtype)
    nc = _as_pair_tensor("chosen_lengths", chosen_lengths, num_pairs, dtype)
    nr = _as_pair_tensor("rejected_lengths", rejected_lengths, num_pairs, dtype)
    _check_lengths("chosen_lengths", nc)
    _check_lengths("rejected_lengths", nr)

    given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if given[0] != given[1]:
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if config.needs_reference and not given[0]:
        raise ValueError(
            f"loss_type={config.loss_type!r} needs reference log-probs: pass ref_chosen_logps "
            "and ref_rejected_logps (reference: precompute or resident)"
        )
    if not config.needs_reference and given[0]:
        raise ValueError(
            f"loss_type={config.loss_type!r} is reference-free: pass no reference log-probs "
            "(reference: none), so that no reference forward is wasted"
        )
    rc = rr = None
    if given[0]:
        rc = _as_pair_tensor("ref_chosen_logps", ref_chosen_logps, num_pairs, dtype).detach()
        rr = _as_pair_tensor("ref_rejected_logps", ref_rejected_logps, num_pairs, dtype).detach()
    stats = PairStats(pc, pr, nc, nr, rc, rr)

    if config.adaptive:
        log_r = coefficient_log_ratio(stats, config)
        w = adadpo_coefficient(log_r, clip=config.clip, gradient_ratio=config.gradient_ratio)
    else:
        log_r = None
        w = torch.ones_like(pc)

    losses = PREFERENCE_TERMS[config.loss_type](stats, w, config)
    nll_weight = config.effective_nll_weight
    if nll_weight:
        losses = losses + nll_weight * (-stats.chosen_mean)

    with torch.no_grad():
        metrics = _metrics(stats, w, log_r, losses, config)
    return losses, metrics


def implicit_rewards(stats: PairStats, config: LossConfig) -> Tuple[Tensor, Tensor]:
    """Each loss's own implicit reward of the chosen and rejected responses, [P] each, as TRL
    reports it, so that rewards/accuracies is the share of pairs the loss itself ranks right:
    dpo and rdpo beta * rho, ipo beta * rho / n, simpo beta * m, cpo beta * pi, orpo
    lambda * m (without the AdaDPO coefficient, which scales the gradient, not the ranking)."""
    t = config.loss_type
    if t == "ipo":
        return (config.beta * stats.chosen_rho / stats.chosen_lengths,
                config.beta * stats.rejected_rho / stats.rejected_lengths)
    if t == "simpo":
        return config.beta * stats.chosen_mean, config.beta * stats.rejected_mean
    if t == "orpo":
        return config.orpo_lambda * stats.chosen_mean, config.orpo_lambda * stats.rejected_mean
    # dpo, rdpo: beta * rho; cpo (reference-free, rho = pi): beta * pi
    return config.beta * stats.chosen_rho, config.beta * stats.rejected_rho


def _metrics(stats: PairStats, w: Tensor, log_r: Optional[Tensor], losses: Tensor,
             config: LossConfig) -> Dict[str, Tensor]:
    stats = replace(stats, chosen_logps=stats.chosen_logps.detach(),
                    rejected_logps=stats.rejected_logps.detach())
    chosen_rewards, rejected_rewards = implicit_rewards(stats, config)
    # The measured balance, (|dL/ds_w| / q_w) / (|dL/ds_l| / q_l), where q is the (mean or
    # sum) probability and s the loss's score: for every loss type it equals w / r_policy
    # (the tests check this against autograd), so k when unclipped in policy space.
    grad_ratio = torch.exp(torch.log(w) - coefficient_log_ratio(stats, config, space="policy"))
    if log_r is None:
        clipped = torch.zeros_like(w)
    else:
        clipped = ((log_r + math.log(config.gradient_ratio)) > math.log(config.clip)).to(w.dtype)
    return {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(w.dtype).mean(),
        "logps/chosen": stats.chosen_logps.mean(),
        "logps/rejected": stats.rejected_logps.mean(),
        "logps_mean/chosen": stats.chosen_mean.mean(),
        "logps_mean/rejected": stats.rejected_mean.mean(),
        "nll/chosen": (-stats.chosen_mean).mean(),
        "adadpo/coef_mean": w.mean(),
        "adadpo/coef_max": w.max(),
        "adadpo/clip_fraction": clipped.mean(),
        "adadpo/grad_ratio": grad_ratio.mean(),
        "pairs": torch.tensor(float(w.shape[0]), dtype=w.dtype, device=w.device),
        "tokens": (stats.chosen_lengths + stats.rejected_lengths).sum(),
    }


__all__ = [
    "PairStats",
    "PREFERENCE_TERMS",
    "adadpo_coefficient",
    "coefficient_log_ratio",
    "implicit_rewards",
    "preference_loss",
]
