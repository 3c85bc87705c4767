"""Core attention for megatron-core's local layers (no Transformer Engine) on torch's
``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises every row's ``[heads, S, S]``
scores (and probabilities, kept for the backward) and refuses packed THD micro-batches, so a
packed row of many short segments pays ``S^2`` under a block-diagonal mask where Transformer
Engine's THD attention pays the sum of the segments' squares. ``SDPADotProductAttention``
takes its place in the local layer spec:

- THD (``packed_seq_params``, as Transformer Engine takes it): every run of ``cu_seqlens``
  (a segment, or a row's closing padding) is one causal SDPA call, so the cost and the memory
  follow the segments; rotary positions restart per run inside megatron-core, as on GPU.
- rows ``[S, b]``: one SDPA call, causal, or under a given boolean mask (megatron-core's
  convention, True where masked: the context-parallel attention's ``[b, 1, S/CP, S]``).

torch picks the SDPA kernel (its fused CPU kernel works in blocks and keeps no score
matrix); the result is megatron-core's local attention's to float32 rounding
(tests/mcore/test_sdpa_attention.py). Same parameters and state as ``DotProductAttention``
(none), so checkpoints do not depend on which attention ran. Sliding windows are masks of
their own here, within each segment (megatron-core's local attention replaces a given mask
by its window mask, so a packed row's segments would see each other). Where SDPA cannot
stand in (``unsupported_reason``: softmax offsets), the local spec keeps megatron-core's
attention and packed micro-batches use its block-diagonal mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


def unsupported_reason(config) -> Optional[str]:
    """Why SDPA cannot replace megatron-core's local attention for ``config`` (a
    TransformerConfig), or None where it can."""
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type={config.softmax_type!r} (a softmax offset)"
    return None


class SDPADotProductAttention(DotProductAttention):
    """megatron-core's ``DotProductAttention`` computed with ``F.scaled_dot_product_attention``.

    forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None):
        rows: query [sq, b, np, hn], key and value [sk, b, ng, hn], attention_mask None
            (causal, sq == sk) or bool [b or 1, 1, sq, sk] (True masked) -> context
            [sq, b, np * hn];
        THD: query [T, np, hn], key and value [T, ng, hn], packed_seq_params with
            cu_seqlens_q == cu_seqlens_kv -> context [T, np * hn], each run causal alone.
    A layer with a sliding window (``window_size`` (left, right) and
    ``window_attn_skip_freq``, as megatron-core reads them) also masks keys more than
    ``left`` before or ``right`` after the query, within each run and under a given mask.
    Self-attention of a training forward only: no KV cache, causal or given masks.
    """

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"{reason} needs megatron-core's DotProductAttention (without "
                             "context parallelism) or Transformer Engine's; "
                             "SDPADotProductAttention has no softmax offset")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.arbitrary):
            raise ValueError(f"SDPADotProductAttention takes causal or given (arbitrary) "
                             f"masks, not {attn_mask_type}")
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        # DotProductAttention divides its scale by the layer number where
        # apply_query_key_layer_scaling is set and multiplies it back inside its softmax
        self.scale = self.softmax_scale * (self.layer_number
                                           if config.apply_query_key_layer_scaling else 1)
        self.window = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        if self.window is not None and min(self.window) < 0:
            raise ValueError(f"window_size={config.window_size}: SDPADotProductAttention "
                             "takes windows of keys before and after (>= 0 each)")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPADotProductAttention takes no attention_bias "
                             "(nor does megatron-core's DotProductAttention)")
        value = _detached_from_projection(value, query, key)
        if packed_seq_params is not None:
            return self._thd(query, key, value, packed_seq_params)
        if attention_mask is None and query.shape[0] != key.shape[0]:
            # megatron-core's KV-cache decoding: its masks are aligned to the last key
            raise ValueError(f"SDPADotProductAttention: {query.shape[0]} queries over "
                             f"{key.shape[0]} keys without a mask (KV-cache inference) is "
                             "not supported; use megatron-core's DotProductAttention")
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        context = self._attend(q, k, v, None if attention_mask is None else ~attention_mask)
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def _thd(self, query, key, value, params):
        if params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={params.qkv_format!r}: "
                             "SDPADotProductAttention takes 'thd'")
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
            else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None \
            else params.cu_seqlens_kv
        if not torch.equal(cu_q, cu_kv):
            raise ValueError("SDPADotProductAttention takes self-attention THD batches "
                             "(cu_seqlens_q == cu_seqlens_kv)")
        bounds = cu_q.tolist()  # one host read per layer: this path is the one without TE
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens end at {bounds[-1]}, the THD batch holds "
                             f"{query.shape[0]} tokens (under context parallelism THD needs "
                             "Transformer Engine's attention)")
        # [T, heads, hn] -> [1, heads, T, hn]; each run causal on its own
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        runs = [self._attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        context = torch.cat(runs, dim=2)  # [1, heads, T, hn]
        return context.squeeze(0).transpose(0, 1).reshape(query.shape[0], -1)

    def _attend(self, q, k, v, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, np, sq, hn] queries over [B, ng, sk, hn] keys and values; ``allowed`` None
        (causal, sq == sk) or bool broadcastable to [B, np, sq, sk], True where attended."""
        if self.window is not None:
            allowed = self._in_window(q.shape[2], k.shape[2], q.device, allowed)
        dropout = self.attention_dropout.p if self.training else 0.0
        # grouped queries: query head i reads key group i // (np / ng), as megatron-core's
        # repeat_interleave of K and V does, without keeping the repeated copies
        kwargs = dict(attn_mask=allowed, is_causal=allowed is None, dropout_p=dropout,
                      scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        if dropout and not self.config.sequence_parallel:
            # megatron-core's: each tensor-parallel rank drops its own heads' probabilities
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _in_window(self, sq: int, sk: int, device, allowed: Optional[torch.Tensor]):
        """The window as megatron-core's sliding-window mask draws it (query i, aligned to
        the last key, sees keys i - left .. i + right; (left, 0) is causal), within
        ``allowed`` where given."""
        left, right = self.window
        offset = torch.arange(sk, device=device)[None, :] - \
            (torch.arange(sq, device=device)[:, None] + sk - sq)
        window = (offset >= -left) & (offset <= right)
        return window if allowed is None else allowed & window


def _detached_from_projection(value: torch.Tensor, query: torch.Tensor,
                              key: torch.Tensor) -> torch.Tensor:
    """``value``, copied out where it is a view into a larger tensor that neither ``query``
    nor ``key`` shares: megatron-core splits query, key and value out of one fused
    projection, and where rotary embedding (or a norm) has copied the query and key, SDPA,
    which keeps its inputs for the backward, would keep the whole projection alive through
    the value: its query and key parts too, (heads + groups) / groups times the value's size
    (docs/CPU.md). Where the query or key still is such a view, the projection stays anyway
    and a copy would only add to it."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return value  # nothing is kept
    storage = value.untyped_storage()
    if (storage.nbytes() > value.numel() * value.element_size()
            and storage.data_ptr() not in {t.untyped_storage().data_ptr() for t in (query, key)}):
        return value.contiguous() if not value.is_contiguous() else value.clone()
    return value


def core_attention_of(spec):
    """The core attention class of a GPT layer spec (a ModuleSpec of TransformerLayer)."""
    try:
        return spec.submodules.self_attention.submodules.core_attention
    except AttributeError:
        raise ValueError(f"a layer spec whose attention is replaced must be a ModuleSpec of a "
                         f"transformer layer with self_attention.core_attention; got "
                         f"{type(spec).__name__}") from None


def with_core_attention(spec, core):
    """``spec`` with ``core`` as its self-attention's core attention (the rest unchanged)."""
    core_attention_of(spec)
    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, core_attention=core)
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(attention, submodules=submodules)))
