"""The loss family against TRL 1.16's own loss code, fed the same per-token statistics.

Oracle: TRL's DPOTrainer._compute_loss, CPOTrainer.get_batch_loss_metrics and ORPOTrainer's
concatenated_forward + odds_ratio_loss, run unmodified on a stand-in trainer object (their
loss code reads a handful of attributes) and a stand-in model that returns the outputs of
fixed logits. This project's side is the real PreferenceForwardStep.loss_func on the same
logits. Compared: the loss, its gradient with respect to the logits, and the metrics both
name the same. The conventions that differ are documented in docs/LOSSES.md ("TRL
conventions") and asserted here as what they are. trl is in the test extra, pinned to 1.16
(the stand-in trainer names the attributes that release's loss code reads).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from adadpo_megatron.mcore.forward_step import PreferenceForwardStep
from adadpo_megatron.ops.logprobs import shared_length_tail_mask
from adadpo_megatron.ops.loss_config import LossConfig
from tests.support.tolerances import U, rounding

P, S, V = 4, 14, 23
PROMPT = 3


def problem(seed=0):
    """Logits [2P, S - 1, V] (position t predicts token t + 1), token ids, and a completion
    mask with unequal response lengths, chosen rows first."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2 * P, S - 1, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (2 * P, S), generator=g)
    completion = torch.zeros(2 * P, S, dtype=torch.long)
    lengths = [5, 9, 3, 10, 7, 4, 8, 10]  # chosen 5, 9, 3, 10; rejected 7, 4, 8, 10
    for row, n in enumerate(lengths):
        completion[row, PROMPT: PROMPT + n] = 1
    attention = torch.zeros_like(completion)
    for row, n in enumerate(lengths):
        attention[row, : PROMPT + n] = 1
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 20 - 5
    return logits, input_ids, completion, attention, ref


def per_token(logits, input_ids):
    """What a causal LM's head gives TRL: log p of the next token, log sum_v p_v^2."""
    logp = torch.log_softmax(logits, -1)
    token = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    return token, log_sum_sq


def trl_dpo(logits, input_ids, completion, attention, ref, *, loss_type, loss_weights=None,
            beta=0.3, label_smoothing=0.0, ld_alpha=None, use_weighting=False):
    """(loss, metrics) from TRL's DPOTrainer._compute_loss with precomputed references."""
    from trl import DPOTrainer

    def model(**kwargs):
        # TRL's fused head gives log-prob 0 where the label is -100 (prompt, padding)
        token, log_sum_sq = per_token(logits, input_ids)
        token = token * (kwargs["labels"][:, 1:] != -100)
        zeros = torch.zeros_like(token)
        return types.SimpleNamespace(log_probs=token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool(), log_sum_sq_probs=log_sum_sq,
                                     aux_loss=None)

    model.training = True
    accelerator = types.SimpleNamespace(device=torch.device("cpu"),
                                        gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_type if isinstance(loss_type, list) else [loss_type],
        beta=beta, label_smoothing=label_smoothing, use_weighting=use_weighting,
        args=types.SimpleNamespace(discopop_tau=0.05), _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    stub.loss_weights = loss_weights or [1.0] * len(stub.loss_types)
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref[:P], "ref_rejected_logps": ref[P:]}
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def ours(logits, input_ids, completion, ref, config: LossConfig):
    """(loss, metrics) from PreferenceForwardStep.loss_func on the same logits."""
    loss_mask = completion[:, 1:].double()
    labels = torch.where(loss_mask.bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:],
                                                                            -100))
    batch = {"labels": labels, "loss_mask": loss_mask, "example_ids": torch.arange(P)}
    if config.needs_reference:
        batch["ref_logps"] = ref
    if config.ld_alpha is not None:
        batch["ld_tail_mask"] = shared_length_tail_mask(loss_mask, P)
    step = PreferenceForwardStep(config)
    loss_sum, count, report = step.loss_func(batch, None, None, logits)
    metrics = {name: (value[0] / value[1]).item() for name, value in report.items()
               if value[1] > 0}
    return loss_sum / count, metrics


def rounded(logits, input_ids, completion, ref=None, beta=1.0):
    """What float32 rounding moves on this project's side (TRL's runs in float64), by
    tests/support/tolerances.py: each token's log-prob, z_y - logsumexp(z) over V logits, by
    rounding(V + 2) of 2 max|z| + 1 (token_logp_gap's half: one side); each response's sum by
    its tokens' plus rounding(S) of its size; a reward beta (pi - ref) by beta times that
    plus ref's own rounding to float32. Per row: (tokens [2P, S - 1], sums [2P], rewards)."""
    z = logits.detach()
    mask = completion[:, 1:].bool()
    token = rounding(V + 2) * (2 * z.abs().amax(-1) + 1) * mask
    logp, _ = per_token(z, input_ids)
    sums = token.sum(-1) + rounding(S) * (logp * mask).sum(-1).abs()
    refs = U * ref.abs() if ref is not None else torch.zeros_like(sums)
    return token, sums, beta * (sums + refs)


def compare(trl_side, our_side, logits_pair, input_ids, completion):
    (trl_loss, trl_metrics), (our_loss, our_metrics) = trl_side, our_side
    g_trl, = torch.autograd.grad(trl_loss, logits_pair[0])
    g_ours, = torch.autograd.grad(our_loss, logits_pair[1])
    # the loss moves by its derivative with respect to each token's log-prob times that
    # token's rounding (rounded); dL/dlog p_y = g[y] / (1 - p_y) from its gradient g wrt the
    # logits; a response's sum by the derivative times the sum's own rounding; plus the
    # loss's own float32 evaluation (a mean over 2P pairs of terms of ~20 operations)
    token, sums, _ = rounded(logits_pair[0], input_ids, completion)
    logp, _ = per_token(logits_pair[0].detach(), input_ids)
    y = input_ids[:, 1:].unsqueeze(-1)
    slope = (g_trl.gather(-1, y).squeeze(-1) / (1 - logp.exp())).abs()
    bound = (slope * token).sum() + (slope.amax(-1) * (sums - token.sum(-1))).sum()
    bound += rounding(2 * P + 20) * max(abs(trl_loss.item()), 1.0)
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=bound.item())
    # the gradient: not bounded here (it needs the loss's second derivatives): see issue 23
    torch.testing.assert_close(g_ours.double(), g_trl.double(), rtol=1e-5, atol=1e-8)
    return trl_metrics, our_metrics


def metric_bounds(logits, input_ids, completion, ref, beta):
    """{metric: float32 rounding's bound} for the means over pairs both sides report."""
    _, sums, rewards = rounded(logits, input_ids, completion, ref, beta)
    n = completion[:, 1:].sum(-1)
    bounds = {"logps/chosen": sums[:P].mean(), "logps/rejected": sums[P:].mean(),
              "logps_mean/chosen": (sums[:P] / n[:P]).mean(),
              "rewards/chosen": rewards[:P].mean(), "rewards/rejected": rewards[P:].mean(),
              "rewards/accuracies": 0.0}  # a fraction of pairs: equal unless one rounds across
    bounds["rewards/margins"] = bounds["rewards/chosen"] + bounds["rewards/rejected"]
    return {k: float(v) for k, v in bounds.items()}


def _leaves(logits):
    return logits.clone().requires_grad_(), logits.clone().requires_grad_()


TRL_DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                 "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                 "sigmoid_norm"]
SMOOTHING = {"exo_pair": 0.1, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
def test_dpo_trainer_loss_types(loss_type):
    logits, input_ids, completion, attention, ref = problem()
    eps = SMOOTHING.get(loss_type, 0.0)
    a, b = _leaves(logits)
    trl_side = trl_dpo(a, input_ids, completion, attention, ref, loss_type=loss_type,
                       label_smoothing=eps)
    config = LossConfig(loss_type=loss_type, beta=0.3, adaptive=False, label_smoothing=eps,
                        bco_running_mean=False, nll_reduction="token")
    trl_metrics, our_metrics = compare(trl_side, ours(b, input_ids, completion, ref, config),
                                       (a, b), input_ids, completion)
    bounds = metric_bounds(logits, input_ids, completion, ref, 0.3)
    shared = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"}
    if loss_type in ("ipo", "sigmoid_norm"):
        # TRL reports beta * rho for every DPOTrainer loss; here the loss's own reward,
        # beta * rho / n (docs/LOSSES.md, "TRL conventions")
        shared -= {"rewards/chosen", "rewards/rejected", "rewards/margins"}
    if loss_type == "sft":
        shared = {"logps/chosen", "logps/rejected"}  # no preference reward (reference-free)
    for name in sorted(shared):
        assert our_metrics[name] == pytest.approx(trl_metrics[name], abs=bounds[name]), name


def test_dpo_trainer_mpo_mix_wpo_and_ld_dpo():
    logits, input_ids, completion, attention, ref = problem(seed=1)
    cases = [
        ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, {}),
        ({"loss_type": "sigmoid"}, {"use_weighting": True}),
        # (TRL 1.16 multiplies by WPO's weights in place: with sft the forward raises, with
        # hinge the backward does, so those two stay out of this comparison)
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.5, 2.0]},
         {"use_weighting": True}),
        ({"loss_type": "sigmoid"}, {"ld_alpha": 0.4}),
        ({"loss_type": "hinge"}, {"ld_alpha": 0.0}),
    ]
    for mix, extra in cases:
        a, b = _leaves(logits)
        trl_side = trl_dpo(a, input_ids, completion, attention, ref, **mix, **extra)
        config = LossConfig(**mix, **extra, beta=0.3, adaptive=False, bco_running_mean=False,
                            nll_reduction="token")
        trl_metrics, our_metrics = compare(trl_side, ours(b, input_ids, completion, ref, config),
                                           (a, b), input_ids, completion)
        bounds = metric_bounds(logits, input_ids, completion, ref, 0.3)
        for name in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert our_metrics[name] == pytest.approx(trl_metrics[name],
                                                      abs=bounds[name]), (mix, name)


def _trl_cpo_orpo_batch(input_ids, completion, attention):
    chosen, rejected = slice(0, P), slice(P, 2 * P)
    labels = torch.where(completion.bool(), input_ids, torch.full_like(input_ids, -100))
    return {f"{side}_{key}": value[rows]
            for side, rows in (("chosen", chosen), ("rejected", rejected))
            for key, value in (("input_ids", input_ids), ("attention_mask", attention),
                               ("labels", labels))}


def _full_logits(logits):
    """TRL's CPO/ORPO take logits [2P, S, V] and drop the last position themselves."""
    return torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)


def _stub_model(logits):
    return lambda *args, **kwargs: types.SimpleNamespace(logits=_full_logits(logits))


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)


@pytest.mark.parametrize("loss_type", ["cpo", "simpo"])
def test_cpo_trainer(loss_type):
    """CPO (loss_type sigmoid, cpo_alpha 1) and SimPO (CPOTrainer's loss_type simpo,
    cpo_alpha 0), with label smoothing: TRL's NLL is the token mean over the micro-batch's
    chosen responses, nll_reduction: token here."""
    from trl.experimental.cpo import CPOTrainer

    logits, input_ids, completion, attention, _ = problem(seed=2)
    trl_type = "sigmoid" if loss_type == "cpo" else "simpo"
    cpo_alpha = 1.0 if loss_type == "cpo" else 0.0
    a, b = _leaves(logits)
    stub = types.SimpleNamespace(
        is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False, cpo_alpha=cpo_alpha,
        loss_type=trl_type, alpha=0.0, beta=2.5, simpo_gamma=0.8, label_smoothing=0.1,
        accelerator=_accelerator(), concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps)
    stub.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, stub)
    stub.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stub)
    batch = _trl_cpo_orpo_batch(input_ids, completion, attention)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(stub, _stub_model(a), batch)
    config = LossConfig(loss_type=loss_type, beta=2.5, simpo_gamma=0.8, label_smoothing=0.1,
                        adaptive=False, nll_weight=cpo_alpha, nll_reduction="token")
    _, our_metrics = compare((trl_loss, trl_metrics), ours(b, input_ids, completion, None, config),
                             (a, b), input_ids, completion)
    # rewards: beta times the policy's sums (cpo) or per-token means (simpo); no reference
    token, sums, _ = rounded(logits, input_ids, completion)
    n = completion[:, 1:].sum(-1)
    side = sums if loss_type == "cpo" else sums / n
    bounds = {"rewards/chosen": 2.5 * side[:P].mean(), "rewards/rejected": 2.5 * side[P:].mean(),
              "rewards/accuracies": 0.0}
    bounds["rewards/margins"] = bounds["rewards/chosen"] + bounds["rewards/rejected"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert our_metrics[name] == pytest.approx(float(trl_metrics[name]),
                                                  abs=float(bounds[name])), name
    if loss_type == "cpo":
        # the token mean over the chosen responses: its tokens' rounding, and its own
        nll = token[:P].sum() / n[:P].sum() + rounding(int(n[:P].sum())) * abs(
            float(trl_metrics["nll_loss"]))
        assert our_metrics["nll_loss"] == pytest.approx(float(trl_metrics["nll_loss"]),
                                                        abs=float(nll))
        assert our_metrics["logps/chosen"] == pytest.approx(float(trl_metrics["logps/chosen"]),
                                                            abs=float(sums[:P].mean()))
    else:  # TRL's CPO averages the log-probs for simpo and reports them as logps/*
        assert our_metrics["logps_mean/chosen"] == pytest.approx(
            float(trl_metrics["logps/chosen"]), abs=float(side[:P].mean()))


def test_orpo_trainer_odds_ratio_term_and_metrics():
    """ORPO's odds-ratio term (TRL's beta is orpo_lambda here) and its metrics. TRL's NLL also
    counts the prompt tokens (ORPOTrainer: "computed over the full prompt and response"); the
    paper's L_SFT and this project count the response alone, so the NLL is compared as that
    documented difference."""
    from trl.experimental.orpo import ORPOTrainer

    logits, input_ids, completion, attention, _ = problem(seed=3)
    a, b = _leaves(logits)
    stub = types.SimpleNamespace(
        is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=0.25,
        accelerator=_accelerator(), concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps)
    batch = _trl_cpo_orpo_batch(input_ids, completion, attention)
    chosen_mean, rejected_mean, _, _, trl_nll = ORPOTrainer.concatenated_forward(
        stub, _stub_model(a), batch)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = \
        ORPOTrainer.odds_ratio_loss(stub, chosen_mean, rejected_mean)
    trl_metrics = {"rewards/chosen": chosen_rewards.mean(), "log_odds_ratio": log_odds_ratio,
                   "log_odds_chosen": log_odds_chosen,
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean()}
    config = LossConfig(loss_type="orpo", orpo_lambda=0.25, adaptive=False, nll_weight=0.0)
    _, our_metrics = compare((-losses.mean(), trl_metrics),
                             ours(b, input_ids, completion, None, config), (a, b), input_ids,
                             completion)
    # from the per-token means m (their rounding, rounded / n): rewards beta m_w; log odds
    # lo(m) = m - log(1 - e^m), d lo / dm = 1 / (1 - e^m), their difference and its
    # log-sigmoid (slope <= 1); the accuracy a fraction of pairs
    _, sums, _ = rounded(logits, input_ids, completion)
    n = completion[:, 1:].sum(-1)
    logp, _ = per_token(logits.detach(), input_ids)
    m = (logp * completion[:, 1:]).sum(-1) / n
    odds = sums / n / (1 - m.exp())
    bounds = {"rewards/chosen": 0.25 * (sums[:P] / n[:P]).mean(),
              "log_odds_chosen": (odds[:P] + odds[P:]).mean(),
              "log_odds_ratio": (odds[:P] + odds[P:]).mean(), "rewards/accuracies": 0.0}
    for name, value in trl_metrics.items():
        assert our_metrics[name] == pytest.approx(float(value.detach()),
                                                  abs=float(bounds[name])), name
    # TRL's NLL: the token mean over prompt and response tokens of the chosen rows
    token, _ = per_token(logits, input_ids)
    counted = attention[:P, 1:].bool()
    assert float(trl_nll.detach()) == pytest.approx(-token[:P][counted].mean().item(), rel=1e-6)
    response_only = completion[:P, 1:].bool()
    assert abs(float(trl_nll.detach()) + token[:P][response_only].mean().item()) > 1e-3
