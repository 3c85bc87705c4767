"""What a local (no Transformer Engine) Llama layer keeps for its backward, which sets the
activation memory of every CPU step: the SwiGLU MLP keeps what its two GEMMs and its
activation's backward need and nothing more (megatron-core's fused SwiGLU function,
uncompiled on the CPU by cpu_compat), and the attention keeps no view of the fused QKV
projection (which would hold the query and key parts that rotary embedding already copied).

Oracle: the MLP's minimum counted from its shapes (fc1's input [T, h], fc1's output
[T, 2f] from which the backward recomputes the activation, fc2's input [T, f]); for the
attention, the projection's output storage itself. megatron-core's SwiGLU functions (plain,
with a bias, weighted) against F.silu(gate) * up by autograd, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support.distributed import run_distributed
from tests.support.tolerances import gap

TOKENS = 24


COMPILED = ("swiglu", "bias_swiglu", "weighted_swiglu", "swiglu_back", "bias_swiglu_back",
            "weighted_swiglu_back")


def _swiglu_worker(rank, world, out):
    from megatron.core.fusions import fused_bias_swiglu as fused

    from adadpo_megatron.mcore import cpu_compat

    cpu_compat.enable()
    torch.manual_seed(0)
    x = torch.randn(TOKENS, 2, 32) * 3
    bias, weights = torch.randn(32), torch.rand(TOKENS * 2, 1)
    grad = torch.randn(TOKENS, 2, 16)
    results = {"compiled": [n for n in COMPILED
                            if hasattr(getattr(fused, n), "_torchdynamo_orig_callable")]}
    for name in ("plain", "bias", "weighted"):
        sides = []
        for megatron in (True, False):
            y = x.clone().requires_grad_()
            b, w = bias.clone().requires_grad_(), weights.clone().requires_grad_()
            if megatron and name == "weighted":
                output = fused.weighted_bias_swiglu_impl(y.view(-1, 32), None, w)
                output = output.view(TOKENS, 2, 16)
            elif megatron:
                output = fused.bias_swiglu_impl(y, b if name == "bias" else None)
            else:
                gate, up = torch.chunk(y + b if name == "bias" else y, 2, dim=-1)
                output = F.silu(gate) * up
                if name == "weighted":
                    output = output * w.view(TOKENS, 2, 1)
            output.backward(grad)
            extra = {"bias": b.grad, "weighted": w.grad}.get(name)
            sides.append([output.detach(), y.grad] + ([extra] if extra is not None else []))
        # what each element sums in absolute value, and over how many roundings: the
        # forward's product; the gate's gradient g * up * s (1 + gate (1 - s)) term by term
        # (the up half is g * silu(gate)); the bias's, the input's summed over the 48 rows;
        # the weights', g * silu(gate) * up summed over the 16 outputs
        gate, up = torch.chunk(x + bias if name == "bias" else x, 2, dim=-1)
        g = grad * (weights.view(TOKENS, 2, 1) if name == "weighted" else 1)
        s = torch.sigmoid(gate)
        y_grad = torch.cat([(g * up).abs() * s * (1 + gate.abs()), (g * F.silu(gate)).abs()],
                           dim=-1)
        bounds = [gap(9, 1.0) * sides[1][0].abs(), gap(9, 1.0) * y_grad]
        if name == "bias":
            bounds.append(gap(9 + 48, 1.0) * y_grad.reshape(-1, 32).sum(0))
        if name == "weighted":
            bounds.append(gap(9 + 16, 1.0) * (grad * F.silu(gate) * up).abs().reshape(-1, 16)
                          .sum(-1, keepdim=True))
        results[name] = (sides, bounds)
    torch.save(results, out)


def test_megatron_cores_swiglu_runs_uncompiled_and_equals_autograds(tmp_path):
    """megatron-core's fused SwiGLU, with a bias and weighted (its MoE form), after
    cpu_compat.enable(): no function of it compiled, forward and gradient those of
    F.silu(gate) * up by autograd."""
    out = tmp_path / "swiglu.pt"
    run_distributed(_swiglu_worker, 1, str(out))
    results = torch.load(out)
    assert results.pop("compiled") == []
    for name, (sides, bounds) in results.items():
        # two computations of ~9 roundings each (the sigmoid's exp, add and divide, 1 - s,
        # gate (1 - s), 1 + ..., three products), plus a sum's for the bias and the weights,
        # each relative to what it sums
        assert len(sides[0]) == len(bounds) == (2 if name == "plain" else 3)
        for got, want, bound in zip(sides[0], sides[1], bounds, strict=True):
            assert ((got - want).abs() <= bound).all(), name


def _worker(rank, world, out):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from adadpo_megatron.mcore import cpu_compat
    from adadpo_megatron.mcore.model import layer_spec, transformer_config
    from adadpo_megatron.mcore.model_config import ModelConfig, ParallelConfig

    cpu_compat.enable()
    ps.initialize_model_parallel()
    try:
        model = ModelConfig.from_section({"preset": "tiny", "num_layers": 1})
        config = transformer_config(model, ParallelConfig(), dtype=torch.float32, gpu=False)
        layer = build_module(layer_spec(False, config), config=config, layer_number=1)
        qkv_outputs, kept = [], {"mlp": {}, "rest": {}}
        where = ["rest"]

        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:  # activations only
                kept[where[0]][storage.data_ptr()] = storage.nbytes()
            return t

        # held, so that no later tensor takes the projection's address
        layer.self_attention.linear_qkv.register_forward_hook(
            lambda m, args, output: qkv_outputs.append(output[0]))
        layer.mlp.register_forward_pre_hook(lambda *_: where.__setitem__(0, "mlp"))
        layer.mlp.register_forward_hook(lambda *_: where.__setitem__(0, "rest"))
        from megatron.core.models.common.embeddings.rotary_pos_embedding import (
            RotaryEmbedding,
        )

        rope = RotaryEmbedding(config.kv_channels, rotary_percent=1.0)(TOKENS)
        hidden = torch.randn(TOKENS, 1, config.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            output, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rope)
        output.sum().backward()  # what was kept serves a backward
        qkv = [t.untyped_storage().data_ptr() for t in qkv_outputs]
        torch.save({"kept": kept, "qkv": qkv, "bias_activation_fusion":
                    config.bias_activation_fusion, "hidden": config.hidden_size,
                    "ffn": config.ffn_hidden_size}, out)
    finally:
        ps.destroy_model_parallel()


def test_a_local_llama_layer_keeps_only_what_its_backward_needs(tmp_path):
    out = tmp_path / "kept.pt"
    run_distributed(_worker, 1, str(out))
    result = torch.load(out)
    assert result["bias_activation_fusion"]  # megatron-core's SwiGLU function
    h, f, element = result["hidden"], result["ffn"], 4
    # fc1's input, fc1's output (gate and up), fc2's input
    assert sum(result["kept"]["mlp"].values()) == TOKENS * (h + 2 * f + f) * element
    assert len(result["qkv"]) == 1 and result["qkv"][0] not in result["kept"]["rest"]


def test_the_fused_swiglu_is_on_only_where_it_computes_the_models_mlp():
    """megatron-core's fused SwiGLU has no clamp, linear offset or expert bias and is
    refused beside Transformer Engine's activation: those (and a SiLU MLP without a gate,
    and GELU, whose fused forms need torch.compile on the CPU) keep the unfused MLP (asked
    for explicitly, it is refused), and model.bias_activation_fusion=false is kept."""
    from adadpo_megatron.mcore.model import transformer_config
    from adadpo_megatron.mcore.model_config import ModelConfig, ParallelConfig

    def fused(gpu: bool = False, **keys) -> bool:
        model = ModelConfig.from_section({"preset": "tiny", **keys})
        return transformer_config(model, ParallelConfig(), dtype=torch.float32,
                                  gpu=gpu).bias_activation_fusion

    assert fused() and fused(gpu=True)
    assert not fused(gpu=True, activation="gelu")
    assert fused(add_bias_linear=True)  # a dense MLP's bias is fused too (bias_swiglu)
    for keys in ({"gated_linear_unit": False}, {"activation": "gelu"},
                 {"activation_func_clamp_value": 7.0}, {"glu_linear_offset": 1.0},
                 {"num_moe_experts": 2, "add_bias_linear": True},
                 {"bias_activation_fusion": False}):
        assert not fused(**keys), keys
    assert fused(num_moe_experts=2, add_bias_linear=False)
    # asked for where it would compute another MLP: refused, naming the key
    for key, value in (("activation_func_clamp_value", 7.0), ("gated_linear_unit", False),
                       ("glu_linear_offset", 1.0)):
        with pytest.raises(ValueError, match=f"model.{key}"):
            fused(bias_activation_fusion=True, **{key: value})
