"""vocab_parallel_logprobs against full-vocab log_softmax and megatron-core's cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from adadpo_megatron.ops.logprobs import vocab_parallel_logprobs
from tests.support.distributed import run_distributed
from tests.support.slow_reference import reference_logprobs

B, S, V = 2, 9, 48
CHUNK_SIZES = (None, 1, 5, 10**6)
TOLERANCES = {  # (forward, gradient) as (rtol, atol); the gradient is returned in this dtype
    torch.float32: ((1e-6, 1e-5), (1e-5, 1e-6)),
    torch.bfloat16: ((1e-6, 1e-5), (1.6e-2, 1e-5)),
    torch.float16: ((1e-6, 1e-5), (1e-3, 1e-5)),
}


def global_problem(dtype, seed=0):
    """The same global logits, labels (some ignored) and output gradient on every rank."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, S, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = -100
    grad_out = torch.randn(B, S, generator=g)
    return logits, labels, grad_out


def expected_shard(logits, labels, grad_out, rank, world):
    """Reference log-probs and this rank's slice of the full-vocab gradient, in float64."""
    full = logits.double().requires_grad_()
    out = reference_logprobs(full, labels)
    out.backward(grad_out.double())
    shard = V // world
    return out.detach(), full.grad[..., rank * shard:(rank + 1) * shard]


def check_against_reference(rank, world, dtype, tp_group):
    logits, labels, grad_out = global_problem(dtype)
    expected, expected_grad = expected_shard(logits, labels, grad_out, rank, world)
    shard = V // world
    (f_rtol, f_atol), (g_rtol, g_atol) = TOLERANCES[dtype]
    for chunk in CHUNK_SIZES:
        local = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
        out = vocab_parallel_logprobs(local, labels, tp_group=tp_group, chunk_size=chunk)
        assert out.dtype == torch.float32 and out.shape == (B, S)
        torch.testing.assert_close(out.double(), expected, rtol=f_rtol, atol=f_atol,
                                   msg=lambda m, c=chunk: f"forward, chunk_size={c}: {m}")
        assert (out[labels == -100] == 0).all()
        out.backward(grad_out)
        assert local.grad.dtype == dtype
        torch.testing.assert_close(local.grad.double(), expected_grad, rtol=g_rtol, atol=g_atol,
                                   msg=lambda m, c=chunk: f"gradient, chunk_size={c}: {m}")
        assert (local.grad[labels == -100] == 0).all()


def _tp_worker(rank, world, dtype_name):
    check_against_reference(rank, world, getattr(torch, dtype_name), dist.group.WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_tp2_matches_full_vocab_log_softmax(dtype_name):
    run_distributed(_tp_worker, 2, dtype_name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_process_matches_full_vocab_log_softmax(dtype):
    check_against_reference(0, 1, dtype, None)


def _megatron_worker(rank, world):
    """Second oracle: -vocab_parallel_cross_entropy, with megatron-core's own TP group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # the exported op, whose tp_group=None is megatron-core's group (mcore/parallel_groups.py)
    from adadpo_megatron import vocab_parallel_logprobs

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        shard = V // world
        for dtype in (torch.float32, torch.bfloat16):
            logits, labels, grad_out = global_problem(dtype, seed=1)
            keep = labels != -100
            local = logits[..., rank * shard:(rank + 1) * shard]
            ours_in = local.clone().requires_grad_()
            # tp_group=None: falls back to megatron-core's tensor-model-parallel group
            ours = vocab_parallel_logprobs(ours_in, labels, chunk_size=4)
            (ours * grad_out).sum().backward()
            theirs_in = local.clone().requires_grad_()  # it subtracts in place from float32 input
            theirs = -vocab_parallel_cross_entropy(theirs_in.clone(), labels)
            (theirs * grad_out * keep).sum().backward()
            torch.testing.assert_close(ours[keep], theirs[keep].float(), rtol=1e-6, atol=1e-5)
            rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
            torch.testing.assert_close(ours_in.grad.float(), theirs_in.grad.float(), rtol=rtol,
                                       atol=1e-5)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_tp2_matches_megatron_vocab_parallel_cross_entropy():
    run_distributed(_megatron_worker, 2)


def test_no_grad_call_saves_nothing_and_grad_call_saves_no_vocab_copy():
    logits, labels, _ = global_problem(torch.bfloat16)
    logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            out = vocab_parallel_logprobs(logits, labels, chunk_size=3)
        assert out.grad_fn is None and not saved
        out = vocab_parallel_logprobs(logits, labels, chunk_size=3)
    assert out.grad_fn is not None
    # the logits themselves (no copy), the labels and one float32 log-sum-exp per token
    vocab_sized = [t for t in saved if t.numel() >= V]
    assert len(vocab_sized) == 1
    assert vocab_sized[0].data_ptr() == logits.data_ptr()
    assert sum(t.numel() for t in saved) == logits.numel() + 2 * B * S


def test_label_outside_vocabulary_is_an_error():
    logits, labels, _ = global_problem(torch.float32)
    labels[1, 4] = V
    with pytest.raises(ValueError, match=rf"label {V} at flattened token {S + 4} is outside "
                                         rf"the vocabulary \[0, {V}\)"):
        vocab_parallel_logprobs(logits, labels)
    labels[1, 4] = -7
    with pytest.raises(ValueError, match="label -7"):
        vocab_parallel_logprobs(logits, labels)


def test_custom_ignore_index_and_shape_errors():
    logits, labels, _ = global_problem(torch.float32)
    labels = labels.clamp(min=0)
    labels[0, 0] = 0
    out = vocab_parallel_logprobs(logits, labels, ignore_index=0)
    assert out[0, 0] == 0
    expected = reference_logprobs(logits, labels, ignore_index=0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="must agree in every dimension"):
        vocab_parallel_logprobs(logits, labels[:, :-1])
