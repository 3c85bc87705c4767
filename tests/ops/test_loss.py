"""The AdaDPO coefficient and the paper's six losses against the float64 reference.

The rest of TRL's loss family, mixes, LD-DPO and WPO are in test_loss_family.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adadpo_megatron.ops.loss import adadpo_coefficient, preference_loss
from adadpo_megatron.ops.loss_config import MEAN_SCORED_LOSS_TYPES, LossConfig
from tests.support.extremes import assert_finite_at_extremes
from tests.support.slow_reference import reference_coefficient, reference_losses

# The paper's losses (docs/LOSSES.md); every loss type is checked in test_loss_family.py.
LOSS_TYPES = ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo")

def _variants():
    """Every valid (loss_type, reduction, space) combination, adaptive on."""
    for loss_type, reduction, space in itertools.product(LOSS_TYPES, ("mean", "sum"),
                                                         ("policy", "ratio")):
        if loss_type == "orpo" and reduction == "sum":
            continue
        if space == "ratio" and loss_type in ("simpo", "cpo", "orpo"):
            continue
        yield loss_type, reduction, space


VARIANTS = list(_variants())


def make_batch(num_pairs=6, seed=0, dtype=torch.float64, equal_lengths=False, max_len=40):
    """Realistic per-pair statistics: sums of negative log-probs over 3..max_len tokens.

    Whole-sequence probability ratios of long responses are astronomically far from 1 (the
    reason Stable AdaDPO averages per token), so tests of reduction "sum" use short ones.
    """
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(3, max_len, (num_pairs,), generator=g)
    nr = nc.clone() if equal_lengths else torch.randint(3, max_len, (num_pairs,), generator=g)
    # mean log-probs in [-3, -0.2], a reference close to the policy
    pc = -(0.2 + 2.8 * torch.rand(num_pairs, generator=g, dtype=dtype)) * nc
    pr = -(0.2 + 2.8 * torch.rand(num_pairs, generator=g, dtype=dtype)) * nr
    rc = pc + 0.5 * torch.randn(num_pairs, generator=g, dtype=dtype)
    rr = pr + 0.5 * torch.randn(num_pairs, generator=g, dtype=dtype)
    return pc, pr, nc, nr, rc, rr


def call(cfg, pc, pr, nc, nr, rc, rr):
    if cfg.needs_reference:
        return preference_loss(pc, pr, nc, nr, rc, rr, config=cfg)
    return preference_loss(pc, pr, nc, nr, config=cfg)


def config_for(loss_type, reduction="mean", space="policy", **kw):
    kw.setdefault("beta", 0.3)
    return LossConfig(loss_type=loss_type, coefficient_reduction=reduction,
                      coefficient_space=space, **kw)


@pytest.mark.parametrize("loss_type,reduction,space", VARIANTS)
@pytest.mark.parametrize("adaptive", [True, False])
def test_losses_match_reference(loss_type, reduction, space, adaptive):
    cfg = config_for(loss_type, reduction, space, adaptive=adaptive, clip=3.0, rdpo_alpha=0.05)
    batch = make_batch(seed=1)
    expected = reference_losses(*batch, cfg)
    got64, _ = call(cfg, *batch)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)
    got32, _ = call(cfg, *(t.float() if t.is_floating_point() else t for t in batch))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loss_type,reduction,space", VARIANTS)
def test_gradient_treats_coefficient_as_constant(loss_type, reduction, space):
    """Autograd equals finite differences of the reference with w frozen at its value."""
    cfg = config_for(loss_type, reduction, space, clip=math.inf, rdpo_alpha=0.05)
    pc, pr, nc, nr, rc, rr = make_batch(seed=2, max_len=40 if reduction == "mean" else 5)
    w = torch.tensor([reference_coefficient(float(pc[i]), float(pr[i]), float(nc[i]),
                                            float(nr[i]), float(rc[i]), float(rr[i]), cfg)
                      for i in range(len(pc))], dtype=torch.float64)
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _ = call(cfg, pc_, pr_, nc, nr, rc, rr)
    gc, gr = torch.autograd.grad(losses.sum(), (pc_, pr_))
    h = 1e-6
    for i in range(len(pc)):
        for which, analytic in ((0, gc[i]), (1, gr[i])):
            plus, minus = [pc.clone(), pr.clone()], [pc.clone(), pr.clone()]
            plus[which][i] += h
            minus[which][i] -= h
            numeric = (reference_losses(*plus, nc, nr, rc, rr, cfg, w=w)[i]
                       - reference_losses(*minus, nc, nr, rc, rr, cfg, w=w)[i]) / (2 * h)
            assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("regime", ["adaptive_off", "clipped"])
def test_gradcheck_where_coefficient_is_constant(loss_type, regime):
    """Where w does not move (adaptive off, or pinned at C) the loss is smooth: gradcheck."""
    kw = {"adaptive": False} if regime == "adaptive_off" else {"clip": 1e-3}
    cfg = config_for(loss_type, **kw)
    pc, pr, nc, nr, rc, rr = make_batch(num_pairs=3, seed=3)
    if regime == "clipped":
        losses, metrics = call(cfg, pc, pr, nc, nr, rc, rr)
        assert metrics["adadpo/clip_fraction"].item() == 1.0

    def f(a, b):
        return call(cfg, a, b, nc, nr, rc, rr)[0]

    assert torch.autograd.gradcheck(f, (pc.clone().requires_grad_(), pr.clone().requires_grad_()))


def _score_gradients(cfg, pc, pr, nc, nr, rc, rr):
    """Per-pair |dL/ds| of the preference term for the loss's own score s (pi or m)."""
    cfg = LossConfig(**{**cfg.__dict__, "nll_weight": 0.0})
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, metrics = call(cfg, pc_, pr_, nc, nr, rc, rr)
    gc, gr = torch.autograd.grad(losses.sum(), (pc_, pr_))
    if cfg.loss_type in MEAN_SCORED_LOSS_TYPES:  # dL/dm = n dL/dpi
        gc, gr = gc * nc, gr * nr
    return gc.abs(), gr.abs(), metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("k", [1.0, 0.5])
def test_balance_mean_reduction(loss_type, k):
    """docs/LOSSES.md: |dL/d pi_w| / exp(m_w) == k |dL/d pi_l| / exp(m_l) (unclipped, mean).

    For the sum-scored losses (dpo, rdpo, cpo) this is the check as written, with unequal
    lengths. For the length-normalised losses (simpo, ipo, orpo) the score is m, and the
    balance holds for dL/dm (it is the same check when n_w == n_l).
    """
    cfg = config_for(loss_type, clip=math.inf, gradient_ratio=k)
    batch = make_batch(seed=4)
    pc, pr, nc, nr = batch[:4]
    gw, gl, metrics = _score_gradients(cfg, *batch)
    lhs = gw / torch.exp(pc / nc)
    rhs = k * gl / torch.exp(pr / nr)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=0)
    assert metrics["adadpo/grad_ratio"].item() == pytest.approx(k, rel=1e-10)
    assert metrics["adadpo/clip_fraction"].item() == 0.0


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "orpo"])
def test_balance_sum_reduction(loss_type):
    """docs/LOSSES.md: with reduction "sum", |dL/dP_w| == k |dL/dP_l| (P = exp(pi))."""
    cfg = config_for(loss_type, "sum", clip=math.inf)
    equal = loss_type in MEAN_SCORED_LOSS_TYPES
    batch = make_batch(seed=5, equal_lengths=equal, max_len=5)
    pc, pr = batch[:2]
    gw, gl, metrics = _score_gradients(cfg, *batch)
    # dL/dP = dL/dpi / P, compared in log space since P is tiny
    torch.testing.assert_close(torch.log(gw) - pc, torch.log(gl) - pr, rtol=0, atol=1e-9)
    assert metrics["adadpo/grad_ratio"].item() == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("loss_type,reduction,space", VARIANTS)
def test_grad_ratio_metric_is_the_measured_balance(loss_type, reduction, space):
    """The metric equals the autograd balance pair by pair, clipped or not."""
    batch = make_batch(num_pairs=1, seed=6, equal_lengths=True,
                       max_len=40 if reduction == "mean" else 5)
    pc, pr, nc, nr = batch[:4]
    for clip in (math.inf, 1.05):
        cfg = config_for(loss_type, reduction, space, clip=clip)
        gw, gl, metrics = _score_gradients(cfg, *batch)
        scale_w, scale_l = (pc / nc, pr / nr) if reduction == "mean" else (pc, pr)
        measured = (gw / torch.exp(scale_w)) / (gl / torch.exp(scale_l))
        assert metrics["adadpo/grad_ratio"].item() == pytest.approx(measured.item(), rel=1e-9)


def test_adaptive_off_is_plain_dpo_and_imbalanced():
    pc, pr, nc, nr, rc, rr = make_batch(seed=7)
    off = LossConfig(adaptive=False, beta=0.1)
    losses, metrics = preference_loss(pc, pr, nc, nr, rc, rr, config=off)
    z = 0.1 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(z))
    assert metrics["adadpo/coef_mean"].item() == 1.0
    expected_ratio = torch.exp(-(pc / nc - pr / nr)).mean()
    assert metrics["adadpo/grad_ratio"].item() == pytest.approx(expected_ratio.item(), rel=1e-9)


def test_clip_active_and_inactive():
    nc = nr = torch.tensor([10, 10, 10])
    # mean log-prob differences 0.1 (r = 1.105), ln 3 (r = 3, clipped), -1 (r = 0.37)
    pc = torch.tensor([-10.0, -10.0 + 10 * math.log(3.0), -20.0], dtype=torch.float64)
    pr = torch.tensor([-11.0, -10.0, -10.0], dtype=torch.float64)
    cfg = LossConfig(clip=2.0)
    _, metrics = preference_loss(pc, pr, nc, nr, pc, pr, config=cfg)
    w = adadpo_coefficient(pc / nc - pr / nr, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.1), 2.0, math.exp(-1.0)],
                                               dtype=torch.float64))
    assert metrics["adadpo/clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["adadpo/coef_max"].item() == pytest.approx(2.0)
    assert metrics["adadpo/coef_mean"].item() == pytest.approx(w.mean().item())


def test_coefficient_is_detached_and_log_space():
    log_r = torch.tensor([-1e30, -50.0, 0.0, 1e30], requires_grad=True)
    w = adadpo_coefficient(log_r, clip=2.0, gradient_ratio=0.5)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5 * math.exp(-50.0), 0.5, 2.0]))


@pytest.mark.parametrize("adaptive", [True, False])
def test_step_zero_reference_equals_policy(adaptive):
    """With the reference equal to the policy, dpo's loss is exactly ln 2 for every pair."""
    pc, pr, nc, nr, _, _ = make_batch(seed=8, dtype=torch.float32)
    losses, metrics = preference_loss(pc, pr, nc, nr, pc.clone(), pr.clone(),
                                      config=LossConfig(adaptive=adaptive))
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2.0)), rtol=0, atol=1e-7)
    assert metrics["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["dpo", "simpo", "rdpo", "cpo"])
def test_label_smoothing(loss_type):
    batch = make_batch(seed=9)
    cfg = config_for(loss_type, label_smoothing=0.2)
    losses, _ = call(cfg, *batch)
    torch.testing.assert_close(losses, reference_losses(*batch, cfg), rtol=1e-12, atol=1e-12)
    plain, _ = call(config_for(loss_type), *batch)
    assert not torch.allclose(losses, plain)


@pytest.mark.parametrize("loss_type,reduction",
                         sorted({(t, r) for t, r, _ in VARIANTS}))
@pytest.mark.parametrize("adaptive", [True, False])
def test_extreme_inputs_stay_finite(loss_type, reduction, adaptive):
    cfg = config_for(loss_type, reduction, adaptive=adaptive)
    assert_finite_at_extremes(cfg, [0.0, -1e-30, -1e-3, -50.0, -1e4, -1e6, -3e7], adaptive)


def test_metrics_follow_their_definitions():
    pc, pr, nc, nr, rc, rr = make_batch(seed=10)
    cfg = LossConfig(beta=0.2)
    losses, m = preference_loss(pc, pr, nc, nr, rc, rr, config=cfg)
    chosen, rejected = 0.2 * (pc - rc), 0.2 * (pr - rr)
    expected = {
        "loss": losses.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).double().mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        "logps_mean/chosen": (pc / nc).mean(),
        "logps_mean/rejected": (pr / nr).mean(),
        "nll/chosen": (-pc / nc).mean(),
        "pairs": torch.tensor(6.0),
        "tokens": (nc + nr).sum().double(),
    }
    for name, value in expected.items():
        assert m[name].item() == pytest.approx(value.item(), rel=1e-12), name
    assert not any(v.requires_grad for v in m.values())


def test_nll_term_defaults():
    batch = make_batch(seed=11)
    for loss_type in ("cpo", "orpo"):
        with_default, _ = call(config_for(loss_type), *batch)
        without, _ = call(config_for(loss_type, nll_weight=0.0), *batch)
        torch.testing.assert_close(with_default - without, -batch[0] / batch[2])
    dpo_default, _ = call(config_for("dpo"), *batch)
    dpo_nll, _ = call(config_for("dpo", nll_weight=0.5), *batch)
    torch.testing.assert_close(dpo_nll - dpo_default, -0.5 * batch[0] / batch[2])


def test_empty_response_names_the_pair():
    pc, pr, nc, nr, rc, rr = make_batch(seed=12)
    nr = nr.clone()
    nr[4] = 0
    with pytest.raises(ValueError, match=r"rejected_lengths\[4\].*pair 4"):
        preference_loss(pc, pr, nc, nr, rc, rr, config=LossConfig())


def test_reference_errors():
    pc, pr, nc, nr, rc, rr = make_batch(seed=13)
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs"):
        preference_loss(pc, pr, nc, nr, config=LossConfig())
    with pytest.raises(ValueError, match="'simpo' is reference-free"):
        preference_loss(pc, pr, nc, nr, rc, rr, config=LossConfig(loss_type="simpo"))
    with pytest.raises(ValueError, match="both"):
        preference_loss(pc, pr, nc, nr, rc, None, config=LossConfig())


def test_shape_errors():
    pc, pr, nc, nr, rc, rr = make_batch(seed=14)
    with pytest.raises(ValueError, match=r"rejected_lengths must have shape \[6\]"):
        preference_loss(pc, pr, nc, nr[:5], rc, rr, config=LossConfig())
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[P\]"):
        preference_loss(pc[None], pr, nc, nr, rc, rr, config=LossConfig())


def test_rdpo_follows_park_et_al():
    """Park et al. 2024 (and SimPO's table of objectives): the length-penalised reward is
    beta * rho + alpha * |y|, so z = beta (rho_w - rho_l) + alpha (|y_w| - |y_l|). Written here
    from the paper, not from the project's spec, with unequal lengths and alpha != 0."""
    pc, pr, nc, nr, rc, rr = make_batch(seed=12)
    assert (nc != nr).all()
    beta, alpha = 0.3, 0.05
    cfg = config_for("rdpo", adaptive=False, rdpo_alpha=alpha, beta=beta)
    losses, _ = call(cfg, pc, pr, nc, nr, rc, rr)
    z = beta * ((pc - rc) - (pr - rr)) + alpha * (nc - nr)
    torch.testing.assert_close(losses, torch.nn.functional.softplus(-z))
    # a longer chosen response lowers the loss (less push towards length), as the paper says
    longer, _ = call(cfg, pc, pr, nc + 10, nr, rc, rr)
    assert (longer < losses).all()


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo", "rdpo", "cpo", "orpo"])
def test_reward_accuracy_is_the_share_the_loss_itself_ranks_right(loss_type):
    """TRL's implicit rewards, per loss (docs/LOSSES.md, Metrics): the accuracy counts the
    pairs whose own score favours the chosen response."""
    pc, pr, nc, nr, rc, rr = make_batch(num_pairs=40, seed=13)
    cfg = config_for(loss_type, beta=0.4, orpo_lambda=0.7)
    _, m = call(cfg, pc, pr, nc, nr, rc, rr)
    rho_c, rho_r = (pc - rc, pr - rr) if cfg.needs_reference else (pc, pr)
    reward = {"dpo": (0.4 * rho_c, 0.4 * rho_r), "rdpo": (0.4 * rho_c, 0.4 * rho_r),
              "ipo": (0.4 * rho_c / nc, 0.4 * rho_r / nr), "simpo": (0.4 * pc / nc, 0.4 * pr / nr),
              "cpo": (0.4 * pc, 0.4 * pr), "orpo": (0.7 * pc / nc, 0.7 * pr / nr)}[loss_type]
    chosen, rejected = reward
    assert m["rewards/chosen"].item() == pytest.approx(chosen.mean().item(), rel=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(rejected.mean().item(), rel=1e-12)
    assert m["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert 0.0 < m["rewards/accuracies"].item() < 1.0, "the check is not vacuous"
