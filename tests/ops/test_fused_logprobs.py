"""The fused hidden-to-log-prob path against the unfused one (logits, then log-probs)."""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.ops.fused_logprobs import fused_hidden_logprobs

S, B, H, V = 6, 2, 16, 40


def problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, H, generator=g)
    weight = 0.3 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100
    grad_out = torch.randn(B, S, generator=g)
    return hidden, weight, labels, grad_out


def unfused(hidden, weight, labels, grad_out):
    """The oracle: full logits [b, s, V] in float64, log_softmax, gather."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = (h @ w.t()).transpose(0, 1)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.where(labels == -100, torch.zeros_like(logp), logp)
    logp.backward(grad_out.double())
    return logp.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_single_process_matches_full_logits(chunk):
    hidden, weight, labels, grad_out = problem()
    want, want_h, want_w = unfused(hidden, weight, labels, grad_out)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fused_hidden_logprobs(h.reshape(S * B, H), w, labels.t().reshape(-1),
                                chunk_size=chunk).view(S, B).t()
    got.backward(grad_out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), want_w, rtol=1e-5, atol=1e-5)
    assert (got[labels == -100] == 0).all()
