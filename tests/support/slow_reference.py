"""Slow, obviously correct references, written line by line from each paper's formula as
docs/LOSSES.md states it.

Python floats (float64) and the math module, one pair at a time: no vectorisation, no
log-space tricks beyond what the formulas need, nothing shared with the package.
"""

from __future__ import annotations

import math

import torch


def softplus(x: float) -> float:
    """log(1 + exp(x)) without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def neg_log_sigmoid(z: float) -> float:
    return softplus(-z)


def log_one_minus_exp(m: float) -> float:
    return math.log(-math.expm1(m))


def reference_coefficient(pw, pl, nw, nl, rw, rl, cfg) -> float:
    """w of docs/LOSSES.md for one pair."""
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


def sigmoid(z: float) -> float:
    return math.exp(-softplus(-z))


def reference_term(t, pw, pl, nw, nl, rho_w, rho_l, w, cfg, partner=None) -> float:
    """One preference term of one pair, from its paper's formula (TRL 1.16's code for the
    losses TRL has). ``partner``: aot's partner reference sums (ref_w', ref_l'), or
    aot_unpaired's partner values (rejected rho at the chosen's rank, chosen rho at the
    rejected's rank)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    mw, ml = pw / nw, pl / nl

    def smoothed(z):
        return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)

    z = beta * (w * rho_w - rho_l)
    if t in ("dpo", "sigmoid"):
        return smoothed(z)
    if t == "hinge":
        return max(0.0, 1.0 - z)
    if t == "ipo":
        return (w * rho_w / nw - rho_l / nl - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        q = sigmoid(z)
        return q * (-softplus(-z) - math.log(1 - eps)) + (1 - q) * (-softplus(z) - math.log(eps))
    if t == "nca_pair":
        xw, xl = beta * w * rho_w, beta * rho_l
        return neg_log_sigmoid(xw) + 0.5 * neg_log_sigmoid(-xw) + 0.5 * neg_log_sigmoid(-xl)
    if t == "robust":
        return ((1 - eps) * neg_log_sigmoid(z) - eps * neg_log_sigmoid(-z)) / (1 - 2 * eps)
    if t == "bco_pair":
        delta = partner if partner is not None else 0.0
        return (neg_log_sigmoid(beta * w * rho_w - delta)
                + neg_log_sigmoid(-(beta * rho_l - delta)))
    if t == "sppo_hard":
        return (w * rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    if t == "aot":
        ref_w, ref_l = partner
        return smoothed(beta * (w * (pw - ref_w) - (pl - ref_l)))
    if t == "aot_unpaired":
        rejected_at_rank, chosen_at_rank = partner
        return 0.5 * (smoothed(beta * (rho_w - rejected_at_rank))
                      + smoothed(beta * (chosen_at_rank - rho_l)))
    if t == "apo_zero":
        return 1 - sigmoid(beta * w * rho_w) + sigmoid(beta * rho_l)
    if t == "apo_down":
        return sigmoid(beta * rho_w) + 1 - sigmoid(beta * (rho_w - rho_l))
    if t == "discopop":
        mod = sigmoid(z / cfg.discopop_tau)
        return neg_log_sigmoid(z) * (1 - mod) + math.exp(-z) * mod
    if t == "sigmoid_norm":
        return neg_log_sigmoid(beta * (w * rho_w / nw - rho_l / nl))
    if t == "simpo":
        return smoothed(beta * (w * mw - ml) - cfg.simpo_gamma)
    if t == "rdpo":
        return smoothed(z + cfg.rdpo_alpha * (nw - nl))
    if t == "cpo":
        return smoothed(beta * (w * pw - pl))
    if t == "orpo":
        def odds(m):
            return m - log_one_minus_exp(m)
        return cfg.orpo_lambda * neg_log_sigmoid(w * odds(mw) - odds(ml))
    raise AssertionError(t)


def _partners(t, pc, pr, rc, rr, rho_c, rho_r, bco_delta):
    """Per-pair partner values of the batch losses, by plain Python sorting."""
    n = len(pc)
    if t == "bco_pair":
        return [bco_delta] * n
    if t == "aot":
        by_policy = sorted(range(n), key=lambda i: (pc[i] - pr[i], i))
        by_ref = sorted(range(n), key=lambda i: (rc[i] - rr[i], i))
        out = [None] * n
        for k, i in enumerate(by_policy):
            out[i] = (rc[by_ref[k]], rr[by_ref[k]])
        return out
    if t == "aot_unpaired":
        chosen_sorted = sorted(rho_c)
        rejected_sorted = sorted(rho_r)
        return [(rejected_sorted[chosen_sorted.index(rho_c[i])],
                 chosen_sorted[rejected_sorted.index(rho_r[i])]) for i in range(n)]
    return [None] * n


def reference_losses(pc, pr, nc, nr, rc, rr, cfg, w=None, *, wpo=None, bco_delta=0.0
                     ) -> torch.Tensor:
    """[P] float64 losses, pair by pair, for one loss type or a weighted mix.

    ``w`` overrides the coefficient (to hold it fixed), ``wpo`` gives the WPO weights
    (chosen [P], rejected [P]), ``bco_delta`` bco_pair's running mean. aot_unpaired's
    per-pair values are half of the two sorted terms each pair's responses are in; their sum
    is the batch's loss.
    """
    pc, pr, nc, nr = ([float(x) for x in v] for v in (pc, pr, nc, nr))
    n = len(pc)
    if rc is not None:
        rc, rr = [float(x) for x in rc], [float(x) for x in rr]
        rho_c = [pc[i] - rc[i] for i in range(n)]
        rho_r = [pr[i] - rr[i] for i in range(n)]
    else:
        rc = rr = [0.0] * n
        rho_c, rho_r = pc, pr
    types = cfg.loss_type if isinstance(cfg.loss_type, (list, tuple)) else [cfg.loss_type]
    weights = cfg.loss_weights or [1.0] * len(types)
    nll_weight = cfg.nll_weight
    if nll_weight is None:
        nll_weight = 1.0 if {"cpo", "orpo"} & set(types) else 0.0
    total_chosen_tokens = sum(nc)
    out = [0.0] * n
    for t, weight in zip(types, weights, strict=True):
        partners = _partners(t, pc, pr, rc, rr, rho_c, rho_r, bco_delta)
        for i in range(n):
            if t == "sft":
                value = _nll(pc[i], nc[i], n, total_chosen_tokens, cfg)
            else:
                wi = (reference_coefficient(pc[i], pr[i], nc[i], nr[i], rc[i], rr[i],
                                            _single(cfg, t)) if w is None else float(w[i]))
                value = reference_term(t, pc[i], pr[i], nc[i], nr[i], rho_c[i], rho_r[i], wi,
                                       cfg, partners[i])
            out[i] += weight * value
    for i in range(n):
        if wpo is not None:
            out[i] *= float(wpo[0][i]) * float(wpo[1][i])
        out[i] += nll_weight * _nll(pc[i], nc[i], n, total_chosen_tokens, cfg)
    return torch.tensor(out, dtype=torch.float64)


def _nll(pw, nw, num_pairs, total_chosen_tokens, cfg) -> float:
    if getattr(cfg, "nll_reduction", "pair") == "token":
        return -pw * num_pairs / total_chosen_tokens
    return -pw / nw


class _single:
    """cfg seen as one loss type (for reference_coefficient's orpo case)."""

    def __init__(self, cfg, loss_type):
        self._cfg, self.loss_type = cfg, loss_type

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def reference_logprobs(full_logits: torch.Tensor, labels: torch.Tensor, ignore_index=-100):
    """log_softmax over the full vocabulary in float64, gathered at the labels."""
    logp = torch.log_softmax(full_logits.double(), dim=-1)
    safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == ignore_index, torch.zeros_like(out), out)
