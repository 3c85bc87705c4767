"""Float32 rounding bounds: the tolerances of tests that compare two float32 computations of
one quantity (two layouts, two code paths), in place of bare numbers.

Each function bounds how far apart two such computations can be, from quantities the test
measured itself (|pi|, gradient norms, the loss), not from what one machine's BLAS gave.
Model, first order in U (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
2002, ch. 2-4): every float32 operation returns the exact result times (1 + d), |d| <= U, and
either computation (or another machine's BLAS) may order any reduction in any way. Each
computation is within the bound's half of the exact value, so the two are within the bound.

What is derived and what is not: a sum of one-signed terms (a sequence's log-prob) and the
loss's chain rule are bounds under this model, the network's own rounding counted as a chain
of reductions of unit sensitivity (forward_depth). The gradient's rounding is taken relative
to its norm, and across optimizer steps a weight difference is propagated with estimates
(dpo_curvature, dpo_sum_sensitivity). Left out of gradient_gap: a sum's rounding moves
DPO's z by beta * delta-pi, and AdaDPO's coefficient w with its per-token means, and either
moves every pair's share of the gradient. Bounded worst case, w makes step 0's gradient
uncertain by ~2e-3 of its size, and z (nonzero after step 0) later gradients, so the weights
after a second step, by more than their size: no rounding bound on those is useful. Tests
comparing them rely on the model above; seen, they hold with 30 times or more to spare.
"""

from __future__ import annotations

import math

U = 2.0 ** -24  # float32 unit roundoff: half the spacing of floats in [1, 2)
LAMBDA = 7.0  # the probabilistic bound's confidence parameter (see rounding)


def rounding(n: int) -> float:
    """Relative error of a float32 result reached through n roundings (a sum of n terms in any
    order, or a chain of reductions of n terms in all), relative to the magnitude of its terms.

    The worst case is n U (Higham Lemma 3.1 and eq. 4.4: |fl(sum) - sum| <= gamma_(n-1)
    sum|x_i|), reached only if every rounding goes the same way; over thousands of roundings
    it overstates the error by orders of magnitude. With the rounding errors independent and
    of mean zero, the error is within lambda sqrt(n) U with probability >= 1 - 2n exp(-lambda^2
    / 2) (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): > 1 - 1e-6 for n <= 1e4
    at lambda = 7. This returns the smaller of the two (the worst case up to n = 49).
    """
    return U * min(n / (1.0 - n * U), LAMBDA * math.sqrt(n))


def gap(n: int, magnitude: float) -> float:
    """Two float32 computations of one quantity of n roundings whose terms sum to
    ``magnitude`` in absolute value: each within rounding(n) * magnitude of the exact value."""
    return 2.0 * rounding(n) * abs(magnitude)


def forward_depth(layers: int, hidden: int, ffn: int, seq: int, vocab: int) -> int:
    """Roundings from the weights to one token's log-prob in a transformer of these sizes,
    a reduction of n terms counting n: per layer two norms, the QKV, attention-output, router
    and first MLP projections (6 reductions over <= hidden terms; head_dim <= hidden), the
    attention softmax and weighted sum over <= seq positions, the second MLP projection over
    ffn; then the final norm, the output layer and the log-softmax over the vocabulary."""
    return layers * (6 * hidden + 2 * seq + ffn) + 2 * hidden + vocab


def logp_sum_gap(magnitude: float, tokens: int, depth: int) -> float:
    """A summed log-prob pi = sum_t log p_t over ``tokens`` tokens, each from a forward pass of
    ``depth`` roundings. Its terms share one sign, so sum|terms| = |pi| (``magnitude``; a mean
    of such sums over pairs is bounded alike): gap(tokens + depth, |pi|)."""
    return gap(tokens + depth, magnitude)


def token_logp_gap(max_logit: float, depth: int) -> float:
    """One token's log-prob, z_y - logsumexp(z), from a forward pass of ``depth`` roundings
    (its own log-softmax included): each logit is off by rounding(depth) of its size, which
    moves the log-prob by at most twice the largest logit's error (logsumexp is 1-Lipschitz
    in the largest component): gap(depth, 2 max|z|), plus the sum of exponentials' own
    rounding, a relative rounding(vocab <= depth) of a sum >= 1, so at most as much again."""
    return gap(depth, 2.0 * abs(max_logit) + 1.0)


def gradient_gap(grad_norm: float, tokens: int, depth: int) -> float:
    """The gradient (2-norm of the difference): each entry is a sum over the batch's
    ``tokens`` positions of products through the forward and the backward pass (2 depth), and
    the data-parallel sum. Relative to ||g||: this takes its terms to be of ||g||'s size, while
    the chosen and rejected sides partly cancel (seen: a relative gap of 10-30 U, 3 U for a
    sum's; the bound is ~1,000 U)."""
    return gap(tokens + 2 * depth, grad_norm)


def dpo_loss_gap(beta: float, chosen: float, rejected: float, *, reference: bool = True,
                 clip: float = 1.0, loss: float | None = None, log_ratio: float = 1.0) -> float:
    """The DPO / AdaDPO loss L = mean_i l(z_i), l(z) = -log sigmoid(z), z = beta (w rho_w -
    rho_l), rho = pi - pi_ref, given the gaps ``chosen`` and ``rejected`` of the policy's sums
    (logp_sum_gap); where the reference's are recomputed (``reference``), as far apart.

    Chain rule: |l'| = sigmoid(-z) <= 1, and its mean over pairs <= 1 - exp(-L) (concavity)
    when the measured loss L is given; dz/drho_w = beta w <= beta C (``clip``; 1 when not
    adaptive), dz/drho_l = beta. AdaDPO's w = min(C, r) comes from the policy's per-token means
    (log r = pi_w / n_w - pi_l / n_l): its rounding moves z by beta w |rho_w| |d log r| <= beta C
    ``log_ratio`` (chosen + rejected), log_ratio bounding |rho_w| / min(n_w, n_l) (1: the
    policy's tokens within a factor e of the reference's; 0 when not adaptive).
    """
    sides = 2.0 if reference else 1.0
    z = beta * (sides * (clip * chosen + rejected) + clip * log_ratio * (chosen + rejected))
    return z * (1.0 - math.exp(-loss) if loss is not None else 1.0)


def loss_slope(config, mean_logp: float, *, loss: float = 0.0, log_ratio: float = 1.0,
               reach: float = 1.0) -> float:
    """A bound on the sum over a pair's four sums (pi_w, pi_l, ref_w, ref_l) of |d l / d sum|
    for the loss mix ``config`` (a LossConfig): its gap is this times the largest sum's gap.

    Each term (ops/loss.py) is f(x), x linear in the sums with these l1 slopes (lengths >= 1,
    AdaDPO's w <= C rounding with the per-token means: log_ratio r as in dpo_loss_gap, and
    |m| (``mean_logp``) where w multiplies a policy mean or sum; chosen responses at most
    twice the rejected's length): x = beta (w rho_w - rho_l): beta A, A = 2 C (1 + r) + 2;
    ipo's h and sppo_hard's w rho_w: A without beta; simpo's beta (w m_w - m_l): beta M,
    M = C (1 + 2 |m|) + 1; cpo's beta (w pi_w - pi_l): beta (C (1 + 3 |m|) + 1); orpo's log
    odds ratio: M / (1 - e^-|m|). And |f'| for |x| <= ``reach`` (on the scale of beta times a
    reward): -log sigmoid (smoothed or not), hinge, aot: 1; robust 1 / (1 - 2 eps); exo_pair
    (|x| + log((1 - eps) / eps)) / 4; nca_pair 1.5; bco_pair 1 a side (its running mean is 0
    until step 2); apo_zero 1/4, apo_down 1/2; discopop 1 + e^x + (e^x + log(1 + e^x)) /
    (4 tau); ipo 2 (|h| + 1 / (2 beta)), sppo_hard 2 (|w rho_w| + 1 / (2 beta)), both with
    |h|, beta |w rho_w| <= reach; orpo lambda; the NLL and sft 1. WPO's detached weights round
    with 4 per-token means: 4 times the (measured, nonnegative) ``loss``.
    """
    c, r, m = (config.clip, log_ratio, abs(mean_logp)) if config.adaptive else (1.0, 0.0, 0.0)
    b, eps, x = config.beta, config.label_smoothing, reach
    ratio, mean = 2 * c * (1 + r) + 2, c * (1 + 2 * m) + 1
    slope = {"dpo": b * ratio, "rdpo": b * ratio, "hinge": b * ratio, "aot": b * ratio,
             "aot_unpaired": b * ratio, "sigmoid_norm": b * ratio, "bco_pair": b * ratio,
             "robust": b * ratio / (1 - 2 * eps), "nca_pair": 1.5 * b * ratio,
             "exo_pair": b * ratio * (x + math.log((1 - eps) / max(eps, 1e-30))) / 4,
             "apo_zero": b * ratio / 4, "apo_down": b * ratio / 2,
             "discopop": b * ratio * (1 + math.exp(x) + (math.exp(x) + math.log1p(math.exp(x)))
                                      / (4 * config.discopop_tau)),
             "ipo": ratio * 2 * (x + 1 / (2 * b)), "sppo_hard": ratio * 2 * (x / b + 1 / (2 * b)),
             "simpo": b * mean, "cpo": b * (c * (1 + 3 * m) + 1),
             "orpo": config.orpo_lambda * mean / (1 - math.exp(-max(m, 1.0))), "sft": 1.0}
    total = sum(weight * slope[t] for t, weight in config.terms)
    return total + config.effective_nll_weight + (4 * loss if config.use_weighting else 0.0)


def dpo_curvature(grad_norm: float) -> float:
    """An estimate, not a bound, of the DPO loss's Hessian norm at the reference, for what a
    weight difference does to the next gradient. Per pair the Hessian is beta^2 l'' dm dm^T +
    beta l' d2m; at z = 0 l'' = l'^2 = 1/4, so the first (Gauss-Newton) term is g_i g_i^T,
    and their mean has norm ||g||^2 when the pairs' gradients are parallel or orthogonal of one
    size (larger only where they cancel; the network's own d2m is left out)."""
    return grad_norm ** 2


def sgd_weight_gap(lr: float, grad_norms, grad_gaps, *, clip: float = 0.0,
                   curvature: float = 0.0, momentum: float = 0.0) -> float:
    """||w_A - w_B||_2 after len(grad_norms) SGD steps from equal weights.

    Step k moves w by -lr u_k, u = g min(1, clip / ||g||) (+ momentum u_(k-1)). A gradient off
    by dg moves u by dg unclipped and by clip dg / ||g|| clipped (to first order normalising
    removes dg's part along g and scales the rest). The gradient of step k is off by its own
    rounding grad_gaps[k] plus curvature times the weights' difference so far. (Each weight's
    own update rounds too: at most U |w| a step, the elementwise rtol of a comparison.)
    """
    dw = du = 0.0
    for g, dg in zip(grad_norms, grad_gaps, strict=True):
        scale = clip / g if clip and g > clip else 1.0
        du = momentum * du + scale * (dg + curvature * dw)
        dw += lr * du
    return dw


def dpo_sum_sensitivity(beta: float, grad_norm: float, pairs: int) -> float:
    """An estimate, not a bound, of ||d pi / d weights|| for one pair's summed log-prob, for
    what a weight difference does to a later step's sums: at the reference the first step's
    gradient is -(beta / 2) mean_i (w d pi_w,i - d pi_l,i), whose norm is (beta / 2) ||d pi||
    sqrt(1 + w^2) / sqrt(pairs) when the pairs' gradients are orthogonal; w >= 0 is dropped."""
    return 2.0 / beta * grad_norm * math.sqrt(pairs)


def dpo_step_gaps(m, dw: float, *, beta: float, depth: int, seq: int, batch_tokens: int,
                  clip: float = 2.0, adaptive: bool = True, sensitivity: float = 0.0,
                  curvature: float = 0.0, loss_slope: float | None = None):
    """{metric: gap} of one step's (or one evaluation's) DPO / AdaDPO metrics ``m``, computed
    by two layouts from weights ``dw`` apart (in 2-norm), with a resident reference.

    Every policy sum rounds (logp_sum_gap) and moves by ``sensitivity`` * dw; the
    reference's (mean |pi_ref| = |logps - rewards / beta|, exact for means of one-signed
    sums) only rounds. The loss moves by dpo_loss_gap of the rounding plus ``loss_slope`` *
    dw (||g|| for a training step: first order, exact; None: through the sums' moves).
    """
    c, ratio = (clip, 1.0) if adaptive else (1.0, 0.0)
    own = {s: logp_sum_gap(m[f"logps/{s}"], seq, depth) for s in ("chosen", "rejected")}
    side = {s: own[s] + sensitivity * dw for s in own}
    ref = {s: logp_sum_gap(m[f"logps/{s}"] - m[f"rewards/{s}"] / beta, seq, depth) for s in own}
    # a per-token mean is a sum over its n tokens: the same relative gap
    mean = {s: side[s] * abs(m[f"logps_mean/{s}"] / m[f"logps/{s}"]) for s in own}
    gaps = {f"logps/{s}": side[s] for s in own}
    gaps.update({f"logps_mean/{s}": mean[s] for s in own})
    gaps.update({f"rewards/{s}": beta * (side[s] + ref[s]) for s in own})
    gaps["rewards/margins"] = gaps["rewards/chosen"] + gaps["rewards/rejected"]
    gaps["nll/chosen"] = mean["chosen"]
    gaps["adadpo/coef_mean"] = c * (mean["chosen"] + mean["rejected"]) if adaptive else 0.0
    gaps["adadpo/coef_max"] = gaps["adadpo/coef_mean"]  # a max of values each within it
    # exp(log g_w - log g_l - log r), 1 where the balance is exact: ~20 roundings of logs <= 10
    gaps["adadpo/grad_ratio"] = gap(20, 10.0)
    rounded = own if loss_slope is not None else side
    gaps["loss"] = dpo_loss_gap(beta, rounded["chosen"], rounded["rejected"], clip=c,
                                loss=m["loss"], log_ratio=ratio) + (loss_slope or 0.0) * dw
    if "grad_norm" in m:
        gaps["grad_norm"] = gradient_gap(m["grad_norm"], batch_tokens, depth) + curvature * dw
    gaps["weights"] = dw  # the weights' gap this step starts from
    return gaps


def dpo_training_gaps(history, *, beta: float, depth: int, seq: int, batch_tokens: int,
                      lr: float, clip_grad: float, clip: float = 2.0, adaptive: bool = True,
                      momentum: float = 0.0):
    """({metric: gap} for each step of ``history``, the weights' gap after the last step):
    how far two float32 computations (two layouts) of one DPO / AdaDPO run with SGD and a
    resident reference can be apart, from that run's measured metrics (dpo_step_gaps).

    ``seq`` bounds a sequence's tokens, ``batch_tokens`` the positions of a step's global
    batch. Step 0 starts from equal weights, where the policy is the reference: every z is 0
    exactly and the loss a mean of float32 ln 2s. A later step inherits the weights' gap
    (sgd_weight_gap), which moves the loss by ||g|| dw (first order, exact), the gradient by
    curvature * dw and a sum by sensitivity * dw (estimates: dpo_curvature,
    dpo_sum_sensitivity, from step 0's gradient norm).
    """
    pairs = int(history[0]["pairs"])
    estimates = dict(curvature=dpo_curvature(history[0]["grad_norm"]),
                     sensitivity=dpo_sum_sensitivity(beta, history[0]["grad_norm"], pairs))
    sizes = dict(beta=beta, depth=depth, seq=seq, batch_tokens=batch_tokens, clip=clip,
                 adaptive=adaptive)
    steps, norms, own = [], [], []
    for k, m in enumerate(history):
        dw = sgd_weight_gap(lr, norms, own, clip=clip_grad, momentum=momentum,
                            curvature=estimates["curvature"])
        gaps = dpo_step_gaps(m, dw, loss_slope=m["grad_norm"], **sizes, **estimates)
        if k == 0:
            gaps["loss"] = gap(pairs, m["loss"])
        steps.append(gaps)
        norms.append(m["grad_norm"])
        own.append(gradient_gap(m["grad_norm"], batch_tokens, depth))
    return steps, sgd_weight_gap(lr, norms, own, clip=clip_grad, momentum=momentum,
                                 curvature=estimates["curvature"])
