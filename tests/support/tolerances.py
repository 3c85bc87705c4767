"""Float32 rounding bounds: the tolerances of tests that compare two float32 computations of
one quantity (two layouts, two code paths), in place of bare numbers.

Each function bounds how far apart two such computations can be, from quantities the test
measured itself (|pi|, gradient norms, the loss), not from what one machine's BLAS gave.
Model, first order in U (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
2002, ch. 2-4): every float32 operation returns the exact result times (1 + d), |d| <= U, and
either computation (or another machine's BLAS) may order any reduction in any way. Each
computation is within the bound's half of the exact value, so the two are within the bound.
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


def dpo_training_gaps(history, *, beta: float, depth: int, seq: int, batch_tokens: int,
                      lr: float, clip_grad: float, clip: float = 2.0, adaptive: bool = True,
                      momentum: float = 0.0):
    """({metric: gap} for each step of ``history``, the weights' gap after the last step):
    how far two float32 computations (two layouts) of one DPO / AdaDPO run with SGD and a
    resident reference can be apart, from that run's measured metrics.

    ``seq`` bounds a sequence's tokens, ``batch_tokens`` the positions of a step's global
    batch. Step 0 starts from equal weights, where the policy is the reference: z = 0 and the
    loss is ln 2 in both, exactly. A later step inherits the weights' gap dw
    (sgd_weight_gap), which moves the loss by ||g|| dw (first order, exact), the gradient by
    curvature * dw and a sum by sensitivity * dw (estimates: dpo_curvature,
    dpo_sum_sensitivity).
    """
    pairs = int(history[0]["pairs"])
    curvature = dpo_curvature(history[0]["grad_norm"])
    sensitivity = dpo_sum_sensitivity(beta, history[0]["grad_norm"], pairs)
    c, ratio = (clip, 1.0) if adaptive else (1.0, 0.0)
    steps, norms, own = [], [], []
    for k, m in enumerate(history):
        dw = sgd_weight_gap(lr, norms, own, clip=clip_grad, curvature=curvature,
                            momentum=momentum)
        side = {s: logp_sum_gap(m[f"logps/{s}"], seq, depth) + sensitivity * dw
                for s in ("chosen", "rejected")}
        # a per-token mean is a sum over its n tokens: the same relative gap
        mean = {s: side[s] * abs(m[f"logps_mean/{s}"] / m[f"logps/{s}"]) for s in side}
        own.append(gradient_gap(m["grad_norm"], batch_tokens, depth))
        norms.append(m["grad_norm"])
        step = {f"logps/{s}": side[s] for s in side}
        step.update({f"logps_mean/{s}": mean[s] for s in mean})
        # the reference's sums are the first step's policy sums, recomputed alike each step
        rho = {s: side[s] + logp_sum_gap(history[0][f"logps/{s}"], seq, depth) for s in side}
        step["rewards/chosen"] = beta * rho["chosen"]
        step["rewards/rejected"] = beta * rho["rejected"]
        step["rewards/margins"] = beta * (rho["chosen"] + rho["rejected"])
        step["adadpo/coef_mean"] = c * (mean["chosen"] + mean["rejected"]) if adaptive else 0.0
        # step 0: every pair's z is 0 exactly, the loss a mean of float32 ln 2s in any order
        step["loss"] = gap(pairs, m["loss"]) if k == 0 else (
            dpo_loss_gap(beta, side["chosen"], side["rejected"], clip=c, loss=m["loss"],
                         log_ratio=ratio) + m["grad_norm"] * dw)
        step["grad_norm"] = own[-1] + curvature * dw
        steps.append(step)
    return steps, sgd_weight_gap(lr, norms, own, clip=clip_grad, curvature=curvature,
                                 momentum=momentum)
