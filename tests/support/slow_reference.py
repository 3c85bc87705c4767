"""Slow, obviously correct references, written from ADADPO.md line by line.

Python floats (float64) and the math module, one pair at a time: no vectorisation, no
log-space tricks beyond what the formulas need, nothing shared with the package.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def softplus(x: float) -> float:
    """log(1 + exp(x)) without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def neg_log_sigmoid(z: float) -> float:
    return softplus(-z)


def log_one_minus_exp(m: float) -> float:
    return math.log(-math.expm1(m))


def reference_coefficient(pw, pl, nw, nl, rw, rl, cfg) -> float:
    """w of ADADPO.md for one pair."""
    if not cfg.adaptive:
        return 1.0
    mw, ml = pw / nw, pl / nl
    if cfg.coefficient_reduction == "mean":
        log_r = mw - ml
        if cfg.coefficient_space == "ratio":
            log_r -= rw / nw - rl / nl
    else:
        log_r = pw - pl
        if cfg.coefficient_space == "ratio":
            log_r -= rw - rl
    if cfg.loss_type == "orpo":
        log_r += log_one_minus_exp(mw) - log_one_minus_exp(ml)
    return math.exp(min(math.log(cfg.gradient_ratio) + log_r, math.log(cfg.clip)))


def reference_pair_loss(pw, pl, nw, nl, rw, rl, cfg, w: Optional[float] = None) -> float:
    """The loss of one pair; ``w`` overrides the coefficient (to hold it fixed)."""
    if w is None:
        w = reference_coefficient(pw, pl, nw, nl, rw, rl, cfg)
    beta, eps = cfg.beta, cfg.label_smoothing
    mw, ml = pw / nw, pl / nl
    if cfg.needs_reference:
        rho_w, rho_l = pw - rw, pl - rl
    else:
        rho_w, rho_l = pw, pl

    def sigmoid_loss(z):
        return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)

    t = cfg.loss_type
    if t == "dpo":
        loss = sigmoid_loss(beta * (w * rho_w - rho_l))
    elif t == "ipo":
        h = w * rho_w / nw - rho_l / nl
        loss = (h - 1 / (2 * beta)) ** 2
    elif t == "simpo":
        loss = sigmoid_loss(beta * (w * mw - ml) - cfg.simpo_gamma)
    elif t == "rdpo":
        loss = sigmoid_loss(beta * (w * rho_w - rho_l) + cfg.rdpo_alpha * (nw - nl))
    elif t == "cpo":
        loss = sigmoid_loss(beta * (w * pw - pl))
    elif t == "orpo":
        def odds(m):
            return m - log_one_minus_exp(m)
        loss = cfg.orpo_lambda * neg_log_sigmoid(w * odds(mw) - odds(ml))
    else:
        raise AssertionError(t)
    nll = cfg.nll_weight if cfg.nll_weight is not None else (1.0 if t in ("cpo", "orpo") else 0.0)
    return loss + nll * (-mw)


def reference_losses(pc, pr, nc, nr, rc, rr, cfg, w=None) -> torch.Tensor:
    """[P] float64 losses, pair by pair."""
    out = []
    for i in range(len(pc)):
        ref = (float(rc[i]), float(rr[i])) if rc is not None else (0.0, 0.0)
        out.append(reference_pair_loss(float(pc[i]), float(pr[i]), float(nc[i]), float(nr[i]),
                                       *ref, cfg, None if w is None else float(w[i])))
    return torch.tensor(out, dtype=torch.float64)


def reference_logprobs(full_logits: torch.Tensor, labels: torch.Tensor, ignore_index=-100):
    """log_softmax over the full vocabulary in float64, gathered at the labels."""
    logp = torch.log_softmax(full_logits.double(), dim=-1)
    safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == ignore_index, torch.zeros_like(out), out)
