"""SDPADotProductAttention (torch's scaled_dot_product_attention in the local layer spec)
against megatron-core's own DotProductAttention, forward and backward, with grouped queries:
causal rows, rows under a given mask, and THD segments, each attended alone.

Oracle: megatron-core's DotProductAttention, which materialises the scores and masks them
(for THD: on the same tokens as rows under the block-diagonal causal mask of their segments).
"""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.mcore.packed_attention import block_diagonal_causal_mask, thd_cu_seqlens
from tests.support.distributed import run_distributed
from tests.support.tolerances import rounding

HEADS, GROUPS, HEAD_DIM = 4, 2, 8
LENGTH, ROWS = 24, 3


def _config(**fields):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=HEADS * HEAD_DIM,
                             num_attention_heads=HEADS, num_query_groups=GROUPS,
                             use_cpu_initialization=True, attention_dropout=0.0,
                             hidden_dropout=0.0, masked_softmax_fusion=False, **fields)


def test_the_local_spec_takes_sdpa_where_it_can_and_its_packed_format_follows():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from adadpo_megatron.mcore.context_parallel_attention import (
        ContextParallelDotProductAttention,
    )
    from adadpo_megatron.mcore.model import layer_spec, packed_format
    from adadpo_megatron.mcore.sdpa_attention import SDPADotProductAttention, core_attention_of

    for config, core, fmt in (
            (_config(), SDPADotProductAttention, "thd"),
            (_config(window_size=(4, 0)), SDPADotProductAttention, "thd"),
            (_config(context_parallel_size=2), ContextParallelDotProductAttention, "mask"),
            (_config(softmax_type="off-by-one"), DotProductAttention, "mask")):
        assert core_attention_of(layer_spec(False, config)) is core
        assert packed_format(False, config) == fmt
        assert packed_format(True, config) == "thd"  # Transformer Engine's attention
    with pytest.raises(ValueError, match="softmax offset"):
        SDPADotProductAttention(_config(softmax_type="off-by-one"), 1, AttnMaskType.causal,
                                "self")
    with pytest.raises(ValueError, match="causal or given"):
        SDPADotProductAttention(_config(), 1, AttnMaskType.no_mask, "self")


def _segments() -> torch.Tensor:
    """[ROWS, LENGTH] segment ids of uneven lengths (one of a single token), row padding
    (-1) closing two rows."""
    rows = []
    for r, cuts in enumerate(([5, 6, 15], [9, 20], [1, 12])):
        bounds = [0, *cuts, LENGTH]
        ids = [10 * r + s for s in range(len(bounds) - 1)
               for _ in range(bounds[s + 1] - bounds[s])]
        if r < 2:  # the last run is the row's padding
            ids = [-1 if i == ids[-1] else i for i in ids]
        rows.append(ids)
    return torch.tensor(rows)


def _run(module, q, k, v, grad, **kwargs):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, **kwargs)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def _to_thd(x: torch.Tensor) -> torch.Tensor:
    """[S, R, ...] rows -> [R * S, ...] laid end to end, row after row (thd_flatten's order)."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def _worker(rank, world, out_path):
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from adadpo_megatron.mcore import cpu_compat
    from adadpo_megatron.mcore.sdpa_attention import SDPADotProductAttention

    cpu_compat.enable()
    ps.initialize_model_parallel()
    try:
        torch.manual_seed(0)
        q = torch.randn(LENGTH, ROWS, HEADS, HEAD_DIM)
        k, v = (torch.randn(LENGTH, ROWS, GROUPS, HEAD_DIM) for _ in range(2))
        grad = torch.randn(LENGTH, ROWS, HEADS * HEAD_DIM)
        mask = block_diagonal_causal_mask(_segments())
        results = {}
        # layer 3 with apply_query_key_layer_scaling: megatron-core moves the scale into its
        # softmax; the product must stay 1/sqrt(d)
        for name, fields, layer in (("causal", {}, 1), ("masked", {}, 1),
                                    ("scaled", {"apply_query_key_layer_scaling": True}, 3)):
            given = mask if name == "masked" else None
            want = _run(DotProductAttention(_config(**fields), layer, AttnMaskType.causal,
                                            "self"), q, k, v, grad, attention_mask=given)
            got = _run(SDPADotProductAttention(_config(**fields), layer, AttnMaskType.causal,
                                               "self"), q, k, v, grad, attention_mask=given)
            results[name] = (got, want)
        # THD: the same tokens end to end; the oracle is the masked rows, laid out alike
        cu = thd_cu_seqlens(_segments())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=LENGTH, max_seqlen_kv=LENGTH)
        sdpa = SDPADotProductAttention(_config(), 1, AttnMaskType.causal, "self")
        got = _run(sdpa, *(_to_thd(t) for t in (q, k, v, grad)), attention_mask=None,
                   packed_seq_params=params)
        results["thd"] = (got, [_to_thd(t) for t in results["masked"][1]])
        # a sliding window of 5 keys back: rows against megatron-core's window mask, and THD
        # against megatron-core's windowed attention on each run alone
        window = {"window_size": (5, 0)}
        results["window"] = tuple(
            _run(cls(_config(**window), 1, AttnMaskType.causal, "self"), q, k, v, grad,
                 attention_mask=None) for cls in (SDPADotProductAttention, DotProductAttention))
        flat = [_to_thd(t) for t in (q, k, v, grad)]
        got = _run(SDPADotProductAttention(_config(**window), 1, AttnMaskType.causal, "self"),
                   *flat, attention_mask=None, packed_seq_params=params)
        whole = DotProductAttention(_config(**window), 1, AttnMaskType.causal, "self")
        pieces = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            pieces.append(_run(whole, *(t[a:b].unsqueeze(1) for t in flat),
                               attention_mask=None))
        # each run as a row of one: [L, 1, ...] -> [L, ...], the runs end to end
        results["thd_window"] = (got, [torch.cat([piece[i].squeeze(1) for piece in pieces])
                                       for i in range(4)])
        scores = torch.einsum("sbhd,tbhd->bhst", q, k.repeat_interleave(HEADS // GROUPS, dim=2))
        torch.save({"results": results,
                    "max_score": scores.abs().max().item() / HEAD_DIM ** 0.5}, out_path)
    finally:
        ps.destroy_model_parallel()


@pytest.mark.slow  # spawns a process (megatron-core's attention wants its parallel state)
def test_equals_megatron_core_attention_forward_and_backward(tmp_path):
    """Output and the gradients of q, k and v. Tolerance, as for the context-parallel
    attention: both sides compute the same sums in float32 in any order (scores of HEAD_DIM
    terms, a softmax and an output of S terms, a backward chain as long again; a score off by
    d moves a probability by at most 2 d relative), so each tensor is within
    2 rounding(HEAD_DIM + 3 S) (1 + 2 max|score|) S max|tensor| of the oracle's, far below
    what a wrong mask, scale or head grouping changes (entries of order one)."""
    out = tmp_path / "result.pt"
    run_distributed(_worker, 1, str(out))
    saved = torch.load(out, weights_only=False)
    relative = 2 * rounding(HEAD_DIM + 3 * LENGTH) * (1 + 2 * saved["max_score"]) * LENGTH
    for case, (got, want) in saved["results"].items():
        for name, g, w in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=relative * w.abs().max().item(),
                                       msg=lambda m, c=case, n=name: f"{c} {n}: {m}")
