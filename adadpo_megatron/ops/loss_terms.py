"""The preference losses, one function per loss type, and their implicit rewards.

Each term maps (stats, w, config, batch context) to the per-pair loss [P]: ``w`` is the
AdaDPO coefficient [P] (detached), which multiplies the chosen side's reward; ``config`` is
the loss config (beta and the loss's own settings); the batch context holds what a loss reads
from the rest of the batch (adadpo_megatron.ops.pair_stats.BatchContext). The formulas and
their papers are in docs/LOSSES.md; which loss has which traits is the table in
adadpo_megatron.ops.loss_types.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Tuple

import torch
import torch.nn.functional as F

from adadpo_megatron.ops.pair_stats import BatchContext, PairStats


class LossSettings(Protocol):
    """What the terms (and the batch readers of the loss table) read of the loss config:
    adadpo_megatron.ops.loss_config.LossConfig, which imports the loss table, which imports
    these terms."""

    beta: float
    label_smoothing: float
    simpo_gamma: float
    rdpo_alpha: float
    orpo_lambda: float
    discopop_tau: float
    bco_running_mean: bool


Tensor = torch.Tensor

# ORPO's odds need log(1 - p) with p = exp(m) < 1; mean log-probs are clamped below 0 by this
# much so that an all-certain response (m = 0) gives large but finite odds.
ORPO_MAX_MEAN_LOGP = -1e-7


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with p = exp(mean log-prob): ORPO's score."""
    m = mean_logps.clamp(max=ORPO_MAX_MEAN_LOGP)
    return m - log1mexp(m)


# Each preference term maps (stats, w, config, batch context) to the per-pair loss [P].
PreferenceTerm = Callable[[PairStats, Tensor, LossSettings, BatchContext], Tensor]


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z) (conservative DPO), stable for any z."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _z(s: PairStats, w: Tensor, c: LossSettings) -> Tensor:
    """DPO's logit beta * (w rho_w - rho_l): w multiplies the chosen side's reward."""
    return c.beta * (w * s.chosen_rho - s.rejected_rho)


def dpo(s, w, c, ctx):
    return _smoothed(_z(s, w, c), c.label_smoothing)


def hinge(s, w, c, ctx):  # SLiC (Zhao et al. 2023)
    return torch.relu(1.0 - _z(s, w, c))


def ipo(s, w, c, ctx):
    # on per-token log-ratios, as TRL and the IPO authors do for variable lengths
    h = w * s.chosen_rho / s.chosen_lengths - s.rejected_rho / s.rejected_lengths
    return (h - 1.0 / (2.0 * c.beta)) ** 2


def exo_pair(s, w, c, ctx):
    # EXO (Ji et al. 2024, Eq. 16): KL(softmax(z) || (1 - eps, eps)) over {chosen, rejected}
    z, eps = _z(s, w, c), c.label_smoothing
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return (torch.exp(log_qw) * (log_qw - math.log1p(-eps))
            + torch.exp(log_ql) * (log_ql - math.log(eps)))


def nca_pair(s, w, c, ctx):  # NCA (Chen et al. 2024), decoupled chosen and rejected terms
    x_w, x_l = c.beta * w * s.chosen_rho, c.beta * s.rejected_rho
    return -F.logsigmoid(x_w) - 0.5 * F.logsigmoid(-x_w) - 0.5 * F.logsigmoid(-x_l)


def robust(s, w, c, ctx):
    # rDPO (Chowdhury et al. 2024): unbiased under label noise eps
    z, eps = _z(s, w, c), c.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair(s, w, c, ctx):  # BCO (Jung et al. 2024): rewards shifted by their running mean
    x_w, x_l = c.beta * w * s.chosen_rho, c.beta * s.rejected_rho
    return -F.logsigmoid(x_w - ctx.bco_delta) - F.logsigmoid(-(x_l - ctx.bco_delta))


def sppo_hard(s, w, c, ctx):  # SPPO (Wu et al. 2024) with hard 0/1 win probabilities
    target = 0.5 / c.beta
    return (w * s.chosen_rho - target) ** 2 + (s.rejected_rho + target) ** 2


def aot(s, w, c, ctx):
    # AOT (Melnyk et al. 2024), paired: this pair's policy log-ratio meets the reference
    # log-ratio of the same rank; w multiplies the chosen reward against that reference.
    delta = (w * (s.chosen_logps - ctx.aot_ref_chosen)
             - (s.rejected_logps - ctx.aot_ref_rejected))
    return _smoothed(c.beta * delta, c.label_smoothing)


def aot_unpaired(s, w, c, ctx):
    # Sorted chosen and rejected log-ratios meet rank by rank. A pair's chosen response is
    # in one term and its rejected one in another; each pair carries both terms with the
    # partners held constant, and subtracts half of their (detached) value, so the values
    # sum to the batch's loss while each response gets its full gradient.
    a = _smoothed(c.beta * (s.chosen_rho - ctx.unpaired_rejected), c.label_smoothing)
    b = _smoothed(c.beta * (ctx.unpaired_chosen - s.rejected_rho), c.label_smoothing)
    return a + b - 0.5 * (a + b).detach()


def apo_zero(s, w, c, ctx):  # APO-zero (D'Oosterlinck et al. 2024, Eq. 7)
    return 1.0 - torch.sigmoid(c.beta * w * s.chosen_rho) + torch.sigmoid(c.beta * s.rejected_rho)


def apo_down(s, w, c, ctx):  # APO-down (Eq. 8); adaptive is refused, w is 1
    return (torch.sigmoid(c.beta * s.chosen_rho)
            + 1.0 - torch.sigmoid(c.beta * (s.chosen_rho - s.rejected_rho)))


def discopop(s, w, c, ctx):
    # DiscoPOP (Chris Lu et al. 2024, Eq. 5): logistic and exponential losses blended by
    # sigma(z / tau); the exponential part in log space, finite where exp(-z) overflows.
    z, tau = _z(s, w, c), c.discopop_tau
    return (-F.logsigmoid(z) * torch.sigmoid(-z / tau)
            + torch.exp(-z + F.logsigmoid(z / tau)))


def sigmoid_norm(s, w, c, ctx):  # DPO on per-token log-ratios
    z = c.beta * (w * s.chosen_rho / s.chosen_lengths - s.rejected_rho / s.rejected_lengths)
    return -F.logsigmoid(z)


def simpo(s, w, c, ctx):
    z = c.beta * (w * s.chosen_mean - s.rejected_mean) - c.simpo_gamma
    return _smoothed(z, c.label_smoothing)


def rdpo(s, w, c, ctx):
    # Park et al. 2024: the length-penalised reward is beta * rho + alpha * |y|, so a longer
    # chosen response starts ahead and is pushed less towards length
    z = _z(s, w, c) + c.rdpo_alpha * (s.chosen_lengths - s.rejected_lengths)
    return _smoothed(z, c.label_smoothing)


def cpo(s, w, c, ctx):
    z = c.beta * (w * s.chosen_logps - s.rejected_logps)
    return _smoothed(z, c.label_smoothing)


def orpo(s, w, c, ctx):
    z = w * orpo_log_odds(s.chosen_mean) - orpo_log_odds(s.rejected_mean)
    return -c.orpo_lambda * F.logsigmoid(z)


# --------------------------------------------------------------------------- implicit rewards
# The loss's own implicit reward of the chosen and rejected responses, [P] each, as TRL reports
# it, so that rewards/accuracies is the share of pairs the loss itself ranks right (without the
# AdaDPO coefficient, which scales the gradient, not the ranking).
ImplicitReward = Callable[[PairStats, LossSettings], Tuple[Tensor, Tensor]]


def log_ratio_reward(s: PairStats, c: LossSettings) -> Tuple[Tensor, Tensor]:
    """beta * rho (the DPO family; reference-free: beta * pi)."""
    return c.beta * s.chosen_rho, c.beta * s.rejected_rho


def per_token_log_ratio_reward(s: PairStats, c: LossSettings) -> Tuple[Tensor, Tensor]:
    """beta * rho / n (ipo, sigmoid_norm)."""
    return (c.beta * s.chosen_rho / s.chosen_lengths,
            c.beta * s.rejected_rho / s.rejected_lengths)


def mean_logp_reward(s: PairStats, c: LossSettings) -> Tuple[Tensor, Tensor]:
    """beta * m (simpo)."""
    return c.beta * s.chosen_mean, c.beta * s.rejected_mean


def orpo_reward(s: PairStats, c: LossSettings) -> Tuple[Tensor, Tensor]:
    """lambda * m (orpo, as TRL's ORPOTrainer reports it)."""
    return c.orpo_lambda * s.chosen_mean, c.orpo_lambda * s.rejected_mean
