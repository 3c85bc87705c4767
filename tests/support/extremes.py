"""The extreme-input check every loss type passes: sums of log-probs from 0 to far below any
real response, over responses of 1 to 140001 tokens."""

from __future__ import annotations

import itertools

import torch

from adadpo_megatron.ops.loss import preference_loss


def assert_finite_at_extremes(config, values, adaptive: bool) -> None:
    """Losses, gradients and metrics of ``config`` are finite for every pair of sums drawn
    from ``values`` (the reference is the pairs reversed), except the grad_ratio metric with
    AdaDPO off, which is P_l / P_w itself and overflows float32 for these pairs."""
    pairs = list(itertools.product(values, values))
    pc = torch.tensor([a for a, _ in pairs], requires_grad=True)
    pr = torch.tensor([b for _, b in pairs], requires_grad=True)
    nc = torch.tensor([1 + (i % 3) * 50000 for i in range(len(pairs))])
    nr = torch.tensor([1 + (i % 2) * 70000 for i in range(len(pairs))])
    ref = (pc.detach().flip(0), pr.detach().flip(0)) if config.needs_reference else ()
    losses, metrics = preference_loss(pc, pr, nc, nr, *ref, config=config)
    assert torch.isfinite(losses).all(), losses
    # sft never reads the rejected side: its gradient there is 0
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr), allow_unused=True,
                                 materialize_grads=True)
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()
    for name, value in metrics.items():
        if name == "adadpo/grad_ratio" and not adaptive:
            continue
        assert torch.isfinite(value), (name, value)
