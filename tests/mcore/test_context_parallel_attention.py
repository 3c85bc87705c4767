"""The local context-parallel attention against megatron-core's own DotProductAttention on the
whole sequence in one process, forward and backward, for causal rows and packed segments.

Oracles: megatron-core's DotProductAttention (one process, the whole sequence, its default
causal mask or the block-diagonal one) and, for the chunk bookkeeping, loops written from
the definition of the load-balanced split (rank r holds chunks r and 2 CP - 1 - r).
"""

from __future__ import annotations

import copy

import pytest
import torch

from adadpo_megatron.mcore.context_parallel_attention import (
    ContextParallelDotProductAttention,
    causal_chunk_mask,
    check_context_parallel_spec,
    chunk_positions,
    sequence_order,
    with_context_parallel_attention,
)
from adadpo_megatron.mcore.packed_attention import block_diagonal_causal_mask
from tests.support.distributed import run_distributed
from tests.support.tolerances import rounding

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_by_the_definition_of_the_split(cp):
    length = 2 * cp * 3
    chunk = length // (2 * cp)
    gathered = []
    for rank in range(cp):
        want = [p for part in (rank, 2 * cp - 1 - rank)
                for p in range(part * chunk, (part + 1) * chunk)]
        assert chunk_positions(length, cp, rank).tolist() == want
        mask = causal_chunk_mask(length, cp, rank)
        assert mask.shape == (1, 1, length // cp, length)
        for i, q in enumerate(want):
            for j in range(length):
                assert bool(mask[0, 0, i, j]) == (j > q), (rank, q, j)
        gathered += want
    order = sequence_order(length, cp)
    assert [gathered[i] for i in order.tolist()] == list(range(length))


def test_a_length_the_chunks_cannot_split_is_refused():
    with pytest.raises(ValueError, match="cannot be cut in 2 \\* context_parallel_size = 4"):
        chunk_positions(10, 2, 0)


def test_the_local_spec_gets_the_context_parallel_attention_and_others_are_refused():
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    local = gpt_layer_specs.get_gpt_layer_local_spec()
    spec = with_context_parallel_attention(local)
    core = spec.submodules.self_attention.submodules.core_attention
    assert core is ContextParallelDotProductAttention
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert with_context_parallel_attention(spec) is spec
    check_context_parallel_spec(spec, 2)
    with pytest.raises(ValueError, match="parallel.context_parallel_size=2 needs a "
                                         "context-parallel attention.*DotProductAttention"):
        check_context_parallel_spec(local, 2)
    check_context_parallel_spec(local, 1)

    class OwnAttention(torch.nn.Module):
        pass

    own = copy.deepcopy(local)
    own.submodules.self_attention.submodules.core_attention = OwnAttention
    with pytest.raises(ValueError, match="OwnAttention"):
        with_context_parallel_attention(own)


def _config(cp: int, **fields):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                             num_attention_heads=HEADS, num_query_groups=GROUPS,
                             context_parallel_size=cp, use_cpu_initialization=True,
                             attention_dropout=0.0, hidden_dropout=0.0,
                             masked_softmax_fusion=False, **fields)


def test_sliding_windows_are_refused():
    with pytest.raises(ValueError, match="window_size"):
        ContextParallelDotProductAttention(_config(2, window_size=(4, 0)), 1, None, "self")


def _inputs(length: int, rows: int):
    torch.manual_seed(0)
    q = torch.randn(length, rows, HEADS, HEAD_DIM)
    k = torch.randn(length, rows, GROUPS, HEAD_DIM)
    v = torch.randn(length, rows, GROUPS, HEAD_DIM)
    grad = torch.randn(length, rows, HEADS * HEAD_DIM)
    return q, k, v, grad


def _segments(length: int, rows: int) -> torch.Tensor:
    """Rows of segments of uneven lengths that cross the chunk boundaries, row padding last."""
    ids, row = [], 0
    for r in range(rows):
        cuts = sorted({length // 3 + r, length // 2 + 1, length - 2})
        bounds = [0, *cuts, length]
        ids.append([row + s if s < len(bounds) - 2 else -1
                    for s in range(len(bounds) - 1)
                    for _ in range(bounds[s + 1] - bounds[s])])
        row += len(bounds) - 2
    return torch.tensor(ids)


def _attention(module, q, k, v, grad, mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank, world, packed, out_path):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from adadpo_megatron.mcore import cpu_compat

    cpu_compat.enable()
    ps.initialize_model_parallel(context_parallel_size=world)
    try:
        length, rows = 4 * world * 3, 2
        q, k, v, grad = _inputs(length, rows)
        mask = block_diagonal_causal_mask(_segments(length, rows)) if packed else None
        whole = DotProductAttention(_config(1), 1, AttnMaskType.causal, "self")
        want = _attention(whole, q, k, v, grad, mask)
        mine = chunk_positions(length, world, rank)
        cp = ContextParallelDotProductAttention(_config(world), 1, AttnMaskType.causal, "self")
        local = None if mask is None else mask[:, :, mine]
        got = _attention(cp, q[mine], k[mine], v[mine], grad[mine], local)
        # the largest single score |q_i . k_j| / sqrt(d), per row and head (GQA's k repeated)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k.repeat_interleave(HEADS // GROUPS, dim=2))
        torch.save({"got": got, "want": [t[mine] for t in want], "length": length,
                    "max_score": scores.abs().max().item() / HEAD_DIM ** 0.5},
                   f"{out_path}.{rank}")
    finally:
        ps.destroy_model_parallel()


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("world,packed", [(2, False), (2, True), (4, True)],
                         ids=["cp2_rows", "cp2_packed", "cp4_packed"])
def test_equals_megatron_core_attention_on_the_whole_sequence(tmp_path, world, packed):
    """Output and the gradients of q, k and v on each rank's chunks. Tolerance: both sides
    compute the same sums in float32, in any order: scores of HEAD_DIM terms, a softmax and
    an output of S terms each, and in backward a chain as long again; a score off by d moves
    a probability by at most 2 d relative. So each tensor is within
    gap = 2 rounding(HEAD_DIM + 3 S) (1 + 2 max|score|) S max|tensor| of the oracle's (S
    terms of at most its largest entry each), orders of magnitude below what a wrong chunk
    or mask changes (entries of order one)."""
    out = tmp_path / "r"
    run_distributed(_worker, world, packed, str(out))
    for rank in range(world):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        length = result["length"]
        relative = 2 * rounding(HEAD_DIM + 3 * length) * (1 + 2 * result["max_score"]) * length
        for name, got, want in zip(("output", "dq", "dk", "dv"), result["got"], result["want"],
                                   strict=True):
            torch.testing.assert_close(got, want, rtol=0,
                                       atol=relative * want.abs().max().item(),
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
