"""AdaDPO and the pairwise preference losses, on per-pair sequence statistics.

Pure torch and no megatron import. The inputs are whole-sequence statistics (sums of
response-token log-probs and response-token counts), already reduced over tensor- and
context-parallel ranks; see ``adadpo_megatron.ops.logprobs``. The two losses that sort the
batch (aot, aot_unpaired) gather their per-pair values over the data-parallel group through
``adadpo_megatron.ops.batch_statistics``; every other loss is per pair.

The AdaDPO rule (Chen et al., arXiv 2605.28440): scale the preferred side of the loss by
``w = sg(min(k * P_w / P_l, C))`` so that the gradients on the two probabilities have
equal magnitude. With the default reduction "mean" (Stable AdaDPO) the ratio is built from
per-token geometric-mean probabilities ``exp(mean log-prob)``. Here w multiplies the chosen
side's reward in every loss; the formulas are in docs/LOSSES.md.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from adadpo_megatron.ops.batch_statistics import RewardRunningMean
from adadpo_megatron.ops.loss_config import LossConfig
from adadpo_megatron.ops.loss_terms import ORPO_MAX_MEAN_LOGP, log1mexp, orpo_log_odds
from adadpo_megatron.ops.loss_types import PREFERENCE_TERMS, loss_record
from adadpo_megatron.ops.pair_stats import (
    BatchContext,
    LengthTails,
    PairStats,
    length_desensitised,
)

Tensor = torch.Tensor


def batch_context(stats: PairStats, config: LossConfig, *, group=None,
                  running_mean: Optional[RewardRunningMean] = None) -> BatchContext:
    """The BatchContext of ``config``'s losses, each read as its record says (gathered over
    ``group``, the data-parallel group, for the losses that sort the batch)."""
    fields = {}
    for name, _ in config.terms:
        reader = loss_record(name).batch
        if reader is not None:
            fields.update(reader(stats, config, group, running_mean))
    return BatchContext(**fields)


# --------------------------------------------------------------------------- coefficient


def coefficient_log_ratio(stats: PairStats, config: LossConfig, *, space: Optional[str] = None,
                          loss_type: Optional[str] = None, odds: Optional[bool] = None
                          ) -> Tensor:
    """log r, the log of the probability ratio the AdaDPO coefficient is built from.

    Reduction "mean": ``m_w - m_l``; "sum": ``pi_w - pi_l``; space "ratio" subtracts the same
    quantity under the reference. For a loss whose score is a log-odds (orpo), equal gradients
    need the extra factor ``(1 - exp(m_w)) / (1 - exp(m_l))``.

    Args:
        stats: per-pair statistics, [P].
        config: the loss configuration.
        space: overrides ``config.coefficient_space`` ("policy" or "ratio").
        loss_type: the loss the coefficient is for; default ``config.primary_type``.
        odds: include the log-odds factor; default: where that loss's score is a log-odds.
    Returns:
        [P], in the dtype of ``stats``.
    """
    space = space or config.coefficient_space
    loss_type = loss_type or config.primary_type
    if config.coefficient_reduction == "mean":
        log_r = stats.chosen_mean - stats.rejected_mean
    else:
        log_r = stats.chosen_logps - stats.rejected_logps
    if loss_record(loss_type).odds_scored if odds is None else odds:
        m_w = stats.chosen_mean.clamp(max=ORPO_MAX_MEAN_LOGP)
        m_l = stats.rejected_mean.clamp(max=ORPO_MAX_MEAN_LOGP)
        log_r = log_r + log1mexp(m_w) - log1mexp(m_l)
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


def coefficients(stats: PairStats, config: LossConfig) -> Dict[str, Tensor]:
    """{loss type: w [P]} for every preference term (ones where adaptive is off). Only a
    log-odds-scored loss's (orpo's) differs from the others."""
    out, shared = {}, None
    for name, _ in config.terms:
        record = loss_record(name)
        if record.term is None:
            continue
        if not config.adaptive:
            out[name] = torch.ones_like(stats.chosen_logps)
        elif record.odds_scored:
            out[name] = adadpo_coefficient(
                coefficient_log_ratio(stats, config, loss_type=name), clip=config.clip,
                gradient_ratio=config.gradient_ratio)
        else:
            if shared is None:
                shared = adadpo_coefficient(
                    coefficient_log_ratio(stats, config, loss_type=name),
                    clip=config.clip, gradient_ratio=config.gradient_ratio)
            out[name] = shared
    return out


# --------------------------------------------------------------------------- losses


def preference_terms(stats: PairStats, ws: Dict[str, Tensor], config: LossConfig,
                     ctx: BatchContext) -> Optional[Tensor]:
    """The weighted sum of the preference terms (every loss type but sft), [P]; None when
    the mix has none."""
    total = None
    for name, weight in config.terms:
        term = loss_record(name).term
        if term is None:
            continue
        value = weight * term(stats, ws[name], config, ctx)
        total = value if total is None else total + value
    return total


def chosen_nll(stats: PairStats, config: LossConfig) -> Tensor:
    """Per-pair NLL of the chosen response, [P], whose mean over the micro-batch's pairs is
    the configured average: "pair" -m_w; "token" -pi_w * P / sum(n_w), the mean over every
    chosen token of the micro-batch (TRL's convention)."""
    if config.nll_reduction == "pair":
        return -stats.chosen_mean
    return -stats.chosen_logps * (stats.chosen_lengths.numel() / stats.chosen_lengths.sum())


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
    tails: Optional[LengthTails] = None,
    wpo_weights: Optional[Tuple[Tensor, Tensor]] = None,
    batch_group=None,
    running_mean: Optional[RewardRunningMean] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-pair preference losses with the AdaDPO coefficient, and their metrics.

    Args:
        policy_chosen_logps: [P] sum of the policy's log-probs over y_w's response tokens.
        policy_rejected_logps: [P] the same for y_l.
        chosen_lengths: [P] number of response tokens of y_w (> 0), any numeric dtype.
        rejected_lengths: [P] the same for y_l.
        ref_chosen_logps: [P] the reference's sums for y_w (LD-weighted under ld_alpha);
            required when a loss of the mix needs a reference, refused otherwise.
        ref_rejected_logps: [P] the same for y_l.
        config: the loss configuration.
        tails: LD-DPO's tail sums of the policy, required exactly when ``config.ld_alpha``
            is set.
        wpo_weights: (chosen [P], rejected [P]) WPO's detached sequence weights, required
            exactly when ``config.use_weighting``.
        batch_group: the data-parallel group that aot and aot_unpaired sort over; None sorts
            this process's pairs alone.
        running_mean: bco_pair's running reward mean: read for delta, and this micro-batch's
            rewards are added to its pending step sum.
    Returns:
        losses: [P] per-pair losses, not reduced, in float32 (float64 inputs stay float64).
        metrics: detached 0-dim tensors named as in TRL and docs/LOSSES.md: means over the pairs,
            except ``adadpo/coef_max`` (max), ``pairs``, ``tokens`` and
            ``adadpo/grad_ratio_pairs`` (counts), and ``adadpo/grad_ratio`` (the mean over
            the pairs whose two gradients are nonzero, ``adadpo/grad_ratio_pairs`` of them).
    Raises:
        ValueError: a missing or unexpected reference, tails or weights, mismatched shapes,
            or an empty response (naming the pair index).
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
    if (tails is not None) != (config.ld_alpha is not None):
        raise ValueError("pass tails exactly when loss.ld_alpha is set (LD-DPO)")
    if (wpo_weights is not None) != config.use_weighting:
        raise ValueError("pass wpo_weights exactly when loss.use_weighting is true (WPO)")
    rc = rr = None
    if given[0]:
        rc = _as_pair_tensor("ref_chosen_logps", ref_chosen_logps, num_pairs, dtype).detach()
        rr = _as_pair_tensor("ref_rejected_logps", ref_rejected_logps, num_pairs, dtype).detach()
    plain = PairStats(pc, pr, nc, nr, rc, rr)
    stats = plain
    if tails is not None:
        tails = LengthTails(*(_as_pair_tensor(f"tails.{name}", getattr(tails, name), num_pairs,
                                              dtype)
                              for name in ("chosen_logps", "rejected_logps", "chosen_lengths",
                                           "rejected_lengths")))
        stats = length_desensitised(plain, tails, config.ld_alpha)

    ctx = batch_context(stats, config, group=batch_group, running_mean=running_mean)
    ws = coefficients(stats, config)
    losses = preference_terms(stats, ws, config, ctx)
    sft_weight = config.sft_weight
    nll = chosen_nll(plain, config)
    if sft_weight:
        losses = sft_weight * nll if losses is None else losses + sft_weight * nll
    if wpo_weights is not None:
        chosen_w = _as_pair_tensor("wpo_weights[0]", wpo_weights[0], num_pairs, dtype)
        rejected_w = _as_pair_tensor("wpo_weights[1]", wpo_weights[1], num_pairs, dtype)
        losses = losses * (chosen_w * rejected_w).detach()
    if config.effective_nll_weight:
        losses = losses + config.effective_nll_weight * nll

    if running_mean is not None and config.updates_running_mean:
        running_mean.accumulate(torch.stack([config.beta * stats.chosen_rho,
                                             config.beta * stats.rejected_rho]))
    metrics = _metrics(stats, plain, ws, ctx, losses, nll, config)
    return losses, metrics


def implicit_rewards(stats: PairStats, config: LossConfig) -> Tuple[Tensor, Tensor]:
    """The primary loss's own implicit reward of the chosen and rejected responses, [P] each,
    as TRL reports it (its record's ``reward``: beta * rho for the DPO family, beta * rho / n
    for ipo and sigmoid_norm, beta * m for simpo, lambda * m for orpo), so that
    rewards/accuracies is the share of pairs the loss itself ranks right."""
    return loss_record(config.primary_type).reward(stats, config)


def measured_balance(stats: PairStats, ws: Dict[str, Tensor], config: LossConfig,
                     ctx: BatchContext) -> Tuple[Tensor, Tensor]:
    """The balance AdaDPO aims at, measured with autograd on the preference terms.

    ``(|dL/ds_w| / q_w) / (|dL/ds_l| / q_l)`` per pair, the ratio of the gradients on the two
    probabilities q (per-token geometric mean for reduction "mean", whole sequence for
    "sum"), with s the primary loss's score: the mean log-prob for the length-normalised
    losses, the sum otherwise. Equal to k where the balance is exact and w unclipped.

    Returns:
        (ratio [P], defined [P] bool): a pair where either gradient is 0 (a satisfied hinge, a
        saturated sigmoid) has no balance to measure.
    """
    with torch.enable_grad():
        pc = stats.chosen_logps.detach().clone().requires_grad_()
        pr = stats.rejected_logps.detach().clone().requires_grad_()
        total = preference_terms(replace(stats, chosen_logps=pc, rejected_logps=pr), ws,
                                 config, ctx)
        g_w, g_l = torch.autograd.grad(total.sum(), (pc, pr))
    g_w, g_l = g_w.abs(), g_l.abs()
    if loss_record(config.primary_type).mean_scored:  # dL/dm = n dL/dpi
        g_w, g_l = g_w * stats.chosen_lengths, g_l * stats.rejected_lengths
    # the probabilities' own ratio (for orpo without its odds factor, which w carries)
    log_r = coefficient_log_ratio(stats, config, space="policy", odds=False)
    defined = (g_w > 0) & (g_l > 0) & torch.isfinite(g_w) & torch.isfinite(g_l)
    ratio = torch.exp(torch.log(g_w) - torch.log(g_l) - log_r)
    return torch.where(defined, ratio, torch.zeros_like(ratio)), defined


def _metrics(stats: PairStats, plain: PairStats, ws: Dict[str, Tensor], ctx: BatchContext,
             losses: Tensor, nll: Tensor, config: LossConfig) -> Dict[str, Tensor]:
    stats = replace(stats, chosen_logps=stats.chosen_logps.detach(),
                    rejected_logps=stats.rejected_logps.detach())
    one = torch.ones_like(stats.chosen_logps)
    primary = config.primary_type
    metrics = {"loss": losses.detach().mean()}
    with torch.no_grad():
        chosen_rewards, rejected_rewards = implicit_rewards(stats, config)
        metrics.update({
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(one.dtype).mean(),
            "logps/chosen": stats.chosen_logps.mean(),
            "logps/rejected": stats.rejected_logps.mean(),
            "logps_mean/chosen": stats.chosen_mean.mean(),
            "logps_mean/rejected": stats.rejected_mean.mean(),
            "nll/chosen": (-plain.chosen_mean.detach()).mean(),
            "pairs": torch.tensor(float(one.shape[0]), dtype=one.dtype, device=one.device),
            "tokens": (plain.chosen_lengths + plain.rejected_lengths).sum(),
        })
        if config.has_nll_term:
            metrics["nll_loss"] = nll.detach().mean()
        if any(loss_record(name).odds_scored for name in ws):  # TRL ORPOTrainer's names
            odds = orpo_log_odds(stats.chosen_mean) - orpo_log_odds(stats.rejected_mean)
            metrics["log_odds_chosen"] = odds.mean()
            metrics["log_odds_ratio"] = F.logsigmoid(odds).mean()
        if ctx.bco_delta is not None:
            metrics["bco/delta"] = ctx.bco_delta.detach().to(one.dtype)
    if loss_record(primary).term is None:  # sft alone: no coefficient, no balance
        return metrics
    w = ws[primary]
    ratio, defined = measured_balance(stats, ws, config, ctx)
    with torch.no_grad():
        if config.adaptive:
            log_r = coefficient_log_ratio(stats, config)
            clipped = ((log_r + math.log(config.gradient_ratio)) > math.log(config.clip))
        else:
            clipped = torch.zeros_like(defined)
        count = defined.to(one.dtype).sum()
        metrics.update({
            "adadpo/coef_mean": w.mean(),
            "adadpo/coef_max": w.max(),
            "adadpo/clip_fraction": clipped.to(one.dtype).mean(),
            "adadpo/grad_ratio": ratio.sum() / count.clamp(min=1),
            "adadpo/grad_ratio_pairs": count,
        })
    return metrics


__all__ = [
    "BatchContext",
    "LengthTails",
    "PairStats",
    "PREFERENCE_TERMS",
    "adadpo_coefficient",
    "batch_context",
    "coefficient_log_ratio",
    "coefficients",
    "implicit_rewards",
    "length_desensitised",
    "measured_balance",
    "preference_loss",
]
