"""Every loss type of TRL's DPOTrainer (and this project's), mixes, LD-DPO and WPO against
float64 references written from each paper's formula (tests/support/slow_reference.py), the
AdaDPO balance (exact or measured), and the batch statistics reduced over ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from adadpo_megatron.ops.batch_statistics import RewardRunningMean
from adadpo_megatron.ops.logprobs import (
    shared_length_tail_mask,
    vocab_parallel_log_sum_sq_probs,
)
from adadpo_megatron.ops.loss import LengthTails, preference_loss
from adadpo_megatron.ops.loss_config import (
    EXACT_BALANCE_LOSS_TYPES,
    LOSS_TYPES,
    MEAN_SCORED_LOSS_TYPES,
    MEASURED_BALANCE_LOSS_TYPES,
    NOT_ADAPTIVE,
    LossConfig,
)
from tests.support.distributed import run_distributed
from tests.support.extremes import assert_finite_at_extremes
from tests.support.slow_reference import reference_losses

SMOOTHING = {"exo_pair": 0.1, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}


def family_config(loss_type, **kw):
    """A valid config for ``loss_type``: beta 0.3, the label smoothing it needs, adaptive
    off where it is refused."""
    kw.setdefault("beta", 0.3)
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    if all(t in SMOOTHING for t in types):
        kw.setdefault("label_smoothing", SMOOTHING[types[0]])
    if any(t in NOT_ADAPTIVE for t in types):
        kw["adaptive"] = False
    return LossConfig(loss_type=loss_type, **kw)


def make_batch(num_pairs=7, seed=0, dtype=torch.float64):
    """Per-pair sums over 3..40 tokens of mean log-probs in [-3, -0.2], unequal lengths, a
    reference near the policy."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(3, 40, (num_pairs,), generator=g)
    nr = torch.randint(3, 40, (num_pairs,), generator=g)
    pc = -(0.2 + 2.8 * torch.rand(num_pairs, generator=g, dtype=dtype)) * nc
    pr = -(0.2 + 2.8 * torch.rand(num_pairs, generator=g, dtype=dtype)) * nr
    rc = pc + 2.0 * torch.randn(num_pairs, generator=g, dtype=dtype)
    rr = pr + 2.0 * torch.randn(num_pairs, generator=g, dtype=dtype)
    return pc, pr, nc, nr, rc, rr


def call(cfg, pc, pr, nc, nr, rc, rr, **kw):
    ref = (rc, rr) if cfg.needs_reference else ()
    return preference_loss(pc, pr, nc, nr, *ref, config=cfg, **kw)


def reference(cfg, pc, pr, nc, nr, rc, rr, **kw):
    ref = (rc, rr) if cfg.needs_reference else (None, None)
    return reference_losses(pc, pr, nc, nr, *ref, cfg, **kw)


def _valid(loss_type, adaptive):
    return not (adaptive and loss_type in NOT_ADAPTIVE)


CASES = [(t, a) for t, a in itertools.product(LOSS_TYPES, (True, False)) if _valid(t, a)]


@pytest.mark.parametrize("loss_type,adaptive", CASES)
def test_every_loss_matches_its_paper_formula(loss_type, adaptive):
    cfg = family_config(loss_type, adaptive=adaptive, clip=3.0, rdpo_alpha=0.05)
    batch = make_batch(seed=1)
    expected = reference(cfg, *batch)
    got, _ = call(cfg, *batch)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got32, _ = call(cfg, *(t.float() if t.is_floating_point() else t for t in batch))
    torch.testing.assert_close(got32.double(), expected, rtol=2e-5, atol=2e-5)


def test_aot_unpaired_sums_to_the_sorted_batch_loss():
    """Melnyk et al.: sum_k f(beta (c_(k) - r_(k))) over the separately sorted log-ratios."""
    cfg = family_config("aot_unpaired")
    pc, pr, nc, nr, rc, rr = make_batch(seed=2)
    losses, _ = call(cfg, pc, pr, nc, nr, rc, rr)
    c, r = torch.sort(pc - rc).values, torch.sort(pr - rr).values
    z = cfg.beta * (c - r)
    eps = cfg.label_smoothing
    total = ((1 - eps) * torch.nn.functional.softplus(-z)
             + eps * torch.nn.functional.softplus(z)).sum()
    assert losses.sum().item() == pytest.approx(total.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_finite_differences_of_the_reference(loss_type):
    """Autograd of the summed loss against central differences of the reference's sum, with
    w held at its value (it is a stop-gradient); batch losses included (the sort order does
    not change under a step of 1e-6)."""
    cfg = family_config(loss_type, clip=math.inf, rdpo_alpha=0.05, nll_weight=0.3)
    pc, pr, nc, nr, rc, rr = make_batch(seed=3)
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, metrics = call(cfg, pc_, pr_, nc, nr, rc, rr)
    gc, gr = torch.autograd.grad(losses.sum(), (pc_, pr_), allow_unused=True,
                                 materialize_grads=True)  # sft never reads the rejected side
    w = None
    if cfg.adaptive:
        from tests.support.slow_reference import reference_coefficient
        w = [reference_coefficient(float(pc[i]), float(pr[i]), float(nc[i]), float(nr[i]),
                                   float(rc[i]), float(rr[i]), cfg) for i in range(len(pc))]
    h = 1e-6
    for i in range(len(pc)):
        for which, analytic in ((0, gc[i]), (1, gr[i])):
            plus, minus = [pc.clone(), pr.clone()], [pc.clone(), pr.clone()]
            plus[which][i] += h
            minus[which][i] -= h
            numeric = (reference(cfg, *plus, nc, nr, rc, rr, w=w).sum()
                       - reference(cfg, *minus, nc, nr, rc, rr, w=w).sum()) / (2 * h)
            assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-8), \
                (loss_type, i, which)


def _probability_gradients(cfg, batch):
    """|dL/dq_w| / |dL/dq_l| per pair from autograd on the preference part, q the per-token
    geometric-mean probability (reduction "mean")."""
    pc, pr, nc, nr, rc, rr = batch
    cfg = LossConfig(**{**cfg.__dict__, "nll_weight": 0.0})
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, metrics = call(cfg, pc_, pr_, nc, nr, rc, rr)
    gc, gr = torch.autograd.grad(losses.sum(), (pc_, pr_))
    if cfg.primary_type in MEAN_SCORED_LOSS_TYPES:  # the score is m: dL/dm = n dL/dpi
        gc, gr = gc * nc, gr * nr
    return (gc.abs() / torch.exp(pc / nc)) / (gr.abs() / torch.exp(pr / nr)), metrics


@pytest.mark.parametrize("loss_type", sorted(EXACT_BALANCE_LOSS_TYPES - {"sigmoid"}))
def test_exact_balance_where_the_score_is_the_reward_difference(loss_type):
    cfg = family_config(loss_type, clip=math.inf, gradient_ratio=0.7)
    ratio, metrics = _probability_gradients(cfg, make_batch(seed=4))
    defined = ratio.isfinite() & (ratio > 0)
    assert defined.sum() >= 4, "the check is not vacuous"
    torch.testing.assert_close(ratio[defined], torch.full_like(ratio[defined], 0.7),
                               rtol=1e-9, atol=0)
    assert metrics["adadpo/grad_ratio"].item() == pytest.approx(0.7, rel=1e-9)
    assert metrics["adadpo/grad_ratio_pairs"].item() == defined.sum().item()


@pytest.mark.parametrize("loss_type", sorted(MEASURED_BALANCE_LOSS_TYPES))
def test_measured_balance_is_reported_where_it_is_not_exact(loss_type):
    """Decoupled chosen and rejected terms: w multiplies the chosen reward, the balance is
    not exact, and adadpo/grad_ratio is the autograd measurement."""
    cfg = family_config(loss_type, clip=math.inf)
    ratio, metrics = _probability_gradients(cfg, make_batch(seed=5))
    defined = ratio.isfinite() & (ratio > 0)
    assert metrics["adadpo/grad_ratio"].item() == pytest.approx(ratio[defined].mean().item(),
                                                                rel=1e-9)
    assert (ratio[defined] - 1.0).abs().max() > 1e-3, "the balance is exact here after all"


@pytest.mark.parametrize("loss_type,adaptive", CASES)
def test_extreme_inputs_stay_finite(loss_type, adaptive):
    cfg = family_config(loss_type, adaptive=adaptive, beta=0.1)
    assert_finite_at_extremes(cfg, [0.0, -1e-30, -1e-3, -50.0, -1e4, -1e6], adaptive)


def test_mpo_mix_is_the_weighted_sum_with_token_nll():
    """TRL's MPO usage: loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0]."""
    cfg = LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                     beta=0.3, nll_reduction="token")
    batch = make_batch(seed=6)
    got, metrics = call(cfg, *batch)
    torch.testing.assert_close(got, reference(cfg, *batch), rtol=1e-12, atol=1e-12)
    pc, nc = batch[0], batch[2]
    assert metrics["nll_loss"].item() == pytest.approx((-pc.sum() / nc.sum()).item(), rel=1e-12)
    sft_only = LossConfig(loss_type="sft", adaptive=False, nll_reduction="token")
    alone, _ = call(sft_only, *batch)
    assert alone.mean().item() == pytest.approx((-pc.sum() / nc.sum()).item(), rel=1e-12)


def test_wpo_weights_multiply_the_preference_terms_not_the_nll():
    cfg = family_config(["sigmoid", "sft"], use_weighting=True, nll_weight=0.5)
    batch = make_batch(seed=7)
    g = torch.Generator().manual_seed(0)
    wpo = (torch.rand(7, generator=g, dtype=torch.float64),
           torch.rand(7, generator=g, dtype=torch.float64))
    got, _ = call(cfg, *batch, wpo_weights=wpo)
    torch.testing.assert_close(got, reference(cfg, *batch, wpo=wpo), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="wpo_weights exactly when loss.use_weighting"):
        call(cfg, *batch)


def test_bco_running_mean_is_the_mean_of_earlier_steps():
    cfg = family_config("bco_pair")
    running = RewardRunningMean()
    seen = []
    for step in range(3):
        batch = make_batch(seed=10 + step)
        delta = sum(seen) / len(seen) if seen else 0.0
        got, metrics = call(cfg, *batch, running_mean=running)
        torch.testing.assert_close(got, reference(cfg, *batch, bco_delta=delta),
                                   rtol=1e-12, atol=1e-12)
        assert metrics["bco/delta"].item() == pytest.approx(delta, rel=1e-12, abs=1e-15)
        pc, pr, _, _, rc, rr = batch
        seen += (cfg.beta * (pc - rc)).tolist() + (cfg.beta * (pr - rr)).tolist()
        running.commit()
    restored = RewardRunningMean()
    restored.load_state_dict(running.state_dict())
    assert restored.mean == pytest.approx(sum(seen) / len(seen), rel=1e-12)
    # TRL 1.x has no running mean: delta = 0
    off = family_config("bco_pair", bco_running_mean=False)
    got, _ = call(off, *make_batch(seed=20), running_mean=running)
    torch.testing.assert_close(got, reference(off, *make_batch(seed=20), bco_delta=0.0))


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("sft",)])
def test_reward_accuracy_is_the_share_the_loss_itself_ranks_right(loss_type):
    cfg = family_config(loss_type, beta=0.4, orpo_lambda=0.7)
    pc, pr, nc, nr, rc, rr = make_batch(num_pairs=40, seed=13)
    _, m = call(cfg, pc, pr, nc, nr, rc, rr)
    rho_c, rho_r = (pc - rc, pr - rr) if cfg.needs_reference else (pc, pr)
    if loss_type in ("ipo", "sigmoid_norm"):
        chosen, rejected = 0.4 * rho_c / nc, 0.4 * rho_r / nr
    elif loss_type == "simpo":
        chosen, rejected = 0.4 * pc / nc, 0.4 * pr / nr
    elif loss_type == "orpo":
        chosen, rejected = 0.7 * pc / nc, 0.7 * pr / nr
    else:
        chosen, rejected = 0.4 * rho_c, 0.4 * rho_r
    assert m["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item(),
                                                        rel=1e-12)
    assert m["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert 0.0 < m["rewards/accuracies"].item() < 1.0, "the check is not vacuous"


# --------------------------------------------------------------------------- LD-DPO


def _python_tail_mask(loss_mask, segment_ids, num_pairs):
    """Token by token: position within the response vs the shorter response of the pair."""
    rows, length = loss_mask.shape
    seq = [[r] * length for r in range(rows)] if segment_ids is None else segment_ids.tolist()
    tokens = {}
    for r in range(rows):
        for t in range(length):
            if seq[r][t] >= 0 and loss_mask[r, t] > 0:
                tokens.setdefault(seq[r][t], []).append((r, t))
    out = torch.zeros(rows, length)
    for s, where in tokens.items():
        mate = s + num_pairs if s < num_pairs else s - num_pairs
        shared = min(len(where), len(tokens.get(mate, [])))
        for r, t in where[shared:]:
            out[r, t] = 1.0
    return out


def test_shared_length_tail_mask_rows_and_packed_segments():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 11, generator=g) > 0.4).float()
    mask[:, 0] = 0
    torch.testing.assert_close(shared_length_tail_mask(mask, 3),
                               _python_tail_mask(mask, None, 3))
    # 2 pairs packed in 2 rows: segments 0..3 (pair j = segments j and j + 2), padding -1
    segments = torch.tensor([[0, 0, 0, 0, 2, 2, 2, -1, -1],
                             [1, 1, 3, 3, 3, 3, 3, 3, -1]])
    packed_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 0],
                                [0, 1, 0, 1, 1, 1, 1, 1, 0]]).float()
    expected = _python_tail_mask(packed_mask, segments, 2)
    assert expected.sum() == 1 + 4  # not vacuous: tails on both rows
    torch.testing.assert_close(shared_length_tail_mask(packed_mask, 2, segments), expected)


def test_ld_dpo_weights_the_tail_of_the_longer_response():
    """Liu et al. 2024: log p = sum of the first min(n_w, n_l) token log-probs + alpha *
    the rest; counts likewise, so the AdaDPO coefficient stays a per-token mean."""
    alpha = 0.3
    cfg = family_config("dpo", ld_alpha=alpha)
    g = torch.Generator().manual_seed(3)
    lengths = [(5, 9), (7, 4), (6, 6)]
    cols = {name: [] for name in ("pc", "pr", "tc", "tr", "nc", "nr", "tnc", "tnr", "ldc", "ldr",
                                  "ldnc", "ldnr")}
    for nw, nl in lengths:
        tw = -torch.rand(nw, generator=g, dtype=torch.float64)
        tl = -torch.rand(nl, generator=g, dtype=torch.float64)
        k = min(nw, nl)
        cols["pc"].append(tw.sum()), cols["pr"].append(tl.sum())
        cols["tc"].append(tw[k:].sum()), cols["tr"].append(tl[k:].sum())
        cols["nc"].append(nw), cols["nr"].append(nl)
        cols["tnc"].append(nw - k), cols["tnr"].append(nl - k)
        cols["ldc"].append(tw[:k].sum() + alpha * tw[k:].sum())
        cols["ldr"].append(tl[:k].sum() + alpha * tl[k:].sum())
        cols["ldnc"].append(k + alpha * (nw - k)), cols["ldnr"].append(k + alpha * (nl - k))
    t = {k: torch.tensor([float(x) for x in v], dtype=torch.float64) for k, v in cols.items()}
    rc, rr = t["ldc"] + 0.3, t["ldr"] - 0.2  # LD-weighted reference sums
    tails = LengthTails(t["tc"], t["tr"], t["tnc"], t["tnr"])
    got, metrics = preference_loss(t["pc"], t["pr"], t["nc"], t["nr"], rc, rr, config=cfg,
                                   tails=tails)
    expected = reference_losses(t["ldc"], t["ldr"], t["ldnc"], t["ldnr"], rc, rr,
                                family_config("dpo"))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert metrics["logps/chosen"].item() == pytest.approx(t["ldc"].mean().item(), rel=1e-12)
    assert metrics["tokens"].item() == sum(a + b for a, b in lengths)


# --------------------------------------------------------------------------- WPO's op


def test_log_sum_sq_probs_matches_float64_softmax():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 5, 37, generator=g)
    expected = torch.log((torch.softmax(logits.double(), -1) ** 2).sum(-1))
    for chunk in (None, 1, 4):
        got = vocab_parallel_log_sum_sq_probs(logits, chunk_size=chunk)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def _log_sum_sq_tp_worker(rank, world):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 5, 40, generator=g)
    expected = torch.log((torch.softmax(logits.double(), -1) ** 2).sum(-1))
    shard = 40 // world
    got = vocab_parallel_log_sum_sq_probs(logits[..., rank * shard:(rank + 1) * shard],
                                          tp_group=dist.group.WORLD, chunk_size=2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_log_sum_sq_probs_tp2_matches_full_vocab():
    run_distributed(_log_sum_sq_tp_worker, 2)


# --------------------------------------------------------------------------- over ranks


def _sorted_losses_worker(rank, world, out_path):
    """aot and aot_unpaired with 3 + 5 pairs on two ranks vs the 8 pairs on one process."""
    import torch

    results = {}
    for loss_type in ("aot", "aot_unpaired"):
        cfg = family_config(loss_type, adaptive=False)
        pc, pr, nc, nr, rc, rr = make_batch(num_pairs=8, seed=30)
        mine = slice(0, 3) if rank == 0 else slice(3, 8)
        a, b = pc[mine].clone().requires_grad_(), pr[mine].clone().requires_grad_()
        losses, _ = preference_loss(a, b, nc[mine], nr[mine], rc[mine], rr[mine], config=cfg,
                                    batch_group=dist.group.WORLD)
        ga, gb = torch.autograd.grad(losses.sum(), (a, b))
        results[loss_type] = (losses.detach(), ga, gb)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        torch.save(everyone, out_path)


@pytest.mark.slow
def test_sorting_losses_over_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "sorted.pt"
    run_distributed(_sorted_losses_worker, 2, str(out))
    everyone = torch.load(out)
    for loss_type in ("aot", "aot_unpaired"):
        cfg = family_config(loss_type, adaptive=False)
        pc, pr, nc, nr, rc, rr = make_batch(num_pairs=8, seed=30)
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        losses, _ = preference_loss(a, b, nc, nr, rc, rr, config=cfg)
        ga, gb = torch.autograd.grad(losses.sum(), (a, b))
        joined = [torch.cat([r[loss_type][i] for r in everyone]) for i in range(3)]
        for got, want in zip(joined, (losses.detach(), ga, gb), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _running_mean_worker(rank, world):
    """Rank r holds rewards r+1 (x 3 replicas): the committed mean is the mean of all."""
    running = RewardRunningMean()
    values = torch.full((4,), float(rank + 1), dtype=torch.float64)
    running.accumulate(values)
    running.commit(replicas=1)
    assert running.mean == pytest.approx(1.5) and running.count == 8


@pytest.mark.slow
def test_running_mean_commits_over_all_ranks():
    run_distributed(_running_mean_worker, 2)
