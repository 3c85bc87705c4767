"""Measurements of the reproduction study on a trained tiny model (one process, TP = PP = 1).

Deliberately independent of the training path: log-probs come from the full logits through a
float64 ``log_softmax`` (not the project's vocab-parallel op), and the gradient balance is
read off autograd on the per-token log-probs (not the loss's own ``adadpo/grad_ratio``
metric, which is a formula).

    held = pair_logps(model, dataset)                      # sums, counts, per-token log-probs
    balance = gradient_balance(held, reference, loss_config)
    lengths = greedy_lengths(model, dataset, tokenizer)
"""

from __future__ import annotations

from typing import Dict, List

import torch

from adadpo_megatron import (
    IGNORE_INDEX,
    LossConfig,
    PairStats,
    PreferenceDataset,
    adadpo_coefficient,
    coefficient_log_ratio,
    preference_loss,
)

Tensor = torch.Tensor


def _logits(model, tokens: Tensor) -> Tensor:
    """[b, s, V] float64 logits of a single-stage GPTModel (no labels: megatron returns
    logits batch-first)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None).double()


@torch.no_grad()
def pair_logps(model, dataset: PreferenceDataset, batch_pairs: int = 50) -> Dict[str, Tensor]:
    """Per-token and per-sequence log-probs of every pair's responses under ``model``.

    Returns:
        token: [N, 2, S] float64 log pi(label_t) on response tokens, 0 elsewhere
            (index 0 chosen, 1 rejected).
        mask: [N, 2, S] bool response-token mask.
        sum: [N, 2] sequence log-prob (sum over response tokens).
        count: [N, 2] response-token counts.
    """
    was_training = model.training
    model.eval()
    token = torch.zeros(dataset.labels.shape, dtype=torch.float64)
    for start in range(0, len(dataset), batch_pairs):
        tokens = dataset.tokens[start:start + batch_pairs].flatten(0, 1)
        labels = dataset.labels[start:start + batch_pairs].flatten(0, 1)
        logp = torch.log_softmax(_logits(model, tokens), dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(labels == IGNORE_INDEX, 0.0)
        token[start:start + batch_pairs] = picked.view(-1, 2, labels.shape[-1])
    model.train(was_training)
    mask = dataset.labels != IGNORE_INDEX
    return {"token": token, "mask": mask, "sum": token.sum(-1), "count": mask.sum(-1).double()}


def coefficients(policy: Dict[str, Tensor], reference: Dict[str, Tensor],
                 config: LossConfig) -> Dict[str, Tensor]:
    """Per-pair AdaDPO quantities under ``config``'s coefficient settings.

    Returns:
        log_ratio: [N] the coefficient's log r (before k and the clip), e.g. m_w - m_l.
        coefficient: [N] w = min(k r, C), what AdaDPO multiplies the chosen side by (for a
            DPO run: what it would have used).
        clipped: [N] bool, k r > C.
    """
    stats = PairStats(policy["sum"][:, 0], policy["sum"][:, 1], policy["count"][:, 0],
                      policy["count"][:, 1], reference["sum"][:, 0], reference["sum"][:, 1])
    log_r = coefficient_log_ratio(stats, config)
    w = adadpo_coefficient(log_r, clip=config.clip, gradient_ratio=config.gradient_ratio)
    unclipped = adadpo_coefficient(log_r, clip=float("inf"), gradient_ratio=config.gradient_ratio)
    return {"log_ratio": log_r, "coefficient": w, "clipped": unclipped > config.clip}


def gradient_balance(policy: Dict[str, Tensor], reference: Dict[str, Tensor],
                     config: LossConfig) -> Dict[str, Tensor]:
    """The measured balance of the loss's gradients on the two responses, per pair.

    Autograd on the per-token log-probs gives g_t = dL/d log p_t; the gradient on the token's
    probability is dL/dp_t = g_t / p_t. Per token, the balance is the ratio of the geometric
    means of |dL/dp_t| over y_w's and over y_l's tokens (equal to
    (|dL/dpi_w| / exp(m_w)) / (|dL/dpi_l| / exp(m_l)), docs/LOSSES.md's per-token check); per
    sequence, |dL/dP_w| / |dL/dP_l| with P the sequence probability.

    A pair whose loss is saturated (sigma(-z) underflows, so both gradients are exactly 0)
    has no measurable balance: NaN.

    Returns:
        log_token: [N] log of the per-token balance: 0 is balanced; DPO gives m_l - m_w,
            so a preferred y_w (m_w > m_l) gets exp(m_w - m_l) times less per token.
        log_sequence: [N] log |dL/dP_w| - log |dL/dP_l| (DPO: pi_l - pi_w).
    """
    token = policy["token"].clone().requires_grad_(True)
    mask = policy["mask"]
    sums = (token * mask).sum(-1)
    losses, _ = preference_loss(sums[:, 0], sums[:, 1], policy["count"][:, 0],
                                policy["count"][:, 1], reference["sum"][:, 0],
                                reference["sum"][:, 1], config=config)
    (grad,) = torch.autograd.grad(losses.sum(), token)
    log_abs_dp = torch.log(grad.abs()) - token.detach()  # log |dL/dp_t|
    log_abs_dpi = torch.log(grad.abs())                  # log |dL/d pi|, equal on every token
    count = policy["count"]
    per_token = torch.where(mask, log_abs_dp, 0.0).sum(-1) / count            # [N, 2]
    per_sequence = torch.where(mask, log_abs_dpi, 0.0).sum(-1) / count - policy["sum"]
    return {"log_token": per_token[:, 0] - per_token[:, 1],
            "log_sequence": per_sequence[:, 0] - per_sequence[:, 1]}


def prompts_of(dataset: PreferenceDataset) -> List[List[int]]:
    """Each pair's prompt ids (BOS included): the tokens before the first response label."""
    prompts = []
    for tokens, labels in zip(dataset.tokens[:, 0], dataset.labels[:, 0], strict=True):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        prompts.append(tokens[: first + 1].tolist())
    return prompts


def chosen_responses(dataset: PreferenceDataset, eos_id: int) -> List[List[int]]:
    """Each pair's chosen response ids, without the final EOS."""
    out = []
    for labels in dataset.labels[:, 0]:
        ids = labels[labels != IGNORE_INDEX].tolist()
        out.append(ids[:-1] if ids[-1:] == [eos_id] else ids)
    return out


@torch.no_grad()
def greedy_generate(model, prompts: List[List[int]], *, eos_id: int, vocab_size: int,
                    max_length: int) -> List[List[int]]:
    """Greedy continuations of ``prompts`` up to EOS (excluded) or ``max_length`` tokens in
    all. No KV cache: the whole prefix is re-run per token (sequences here are <= 32 tokens).
    Prompts are batched by length, so no padding enters the attention."""
    was_training = model.training
    model.eval()
    out: List[List[int]] = [[] for _ in prompts]
    by_length: Dict[int, List[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in by_length.items():
        tokens = torch.tensor([prompts[i] for i in rows])
        done = torch.zeros(len(rows), dtype=torch.bool)
        while tokens.shape[1] < max_length and not done.all():
            # ids past the tokenizer's vocabulary are padding of the embedding table
            next_ids = _logits(model, tokens)[:, -1, :vocab_size].argmax(-1)
            done |= next_ids == eos_id
            tokens = torch.cat([tokens, next_ids.unsqueeze(1)], dim=1)
        for row, ids in zip(rows, tokens[:, length:].tolist(), strict=True):
            out[row] = ids[: ids.index(eos_id)] if eos_id in ids else ids
    model.train(was_training)
    return out


def generation_report(model, dataset: PreferenceDataset, tokenizer, max_length: int
                      ) -> Dict[str, float]:
    """Greedy generation on the prompts of ``dataset``: mean length in tokens (EOS
    excluded), share that never emitted EOS, and exact matches with the chosen response."""
    prompts = prompts_of(dataset)
    generated = greedy_generate(model, prompts, eos_id=tokenizer.eos_id,
                                vocab_size=tokenizer.vocab_size, max_length=max_length)
    chosen = chosen_responses(dataset, tokenizer.eos_id)
    room = [max_length - len(p) for p in prompts]
    return {
        "mean_length": sum(map(len, generated)) / len(generated),
        "mean_chosen_length": sum(map(len, chosen)) / len(chosen),
        "no_eos_fraction": sum(len(g) == r for g, r in zip(generated, room, strict=True))
        / len(generated),
        "exact_match": sum(g == c for g, c in zip(generated, chosen, strict=True)) / len(generated),
    }
