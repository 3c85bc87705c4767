"""What a local (no Transformer Engine) Llama layer keeps for its backward, which sets the
activation memory of every CPU step: the SwiGLU MLP keeps what its two GEMMs and its
activation's backward need and nothing more (megatron-core's fused SwiGLU function,
uncompiled on the CPU by cpu_compat), and the attention keeps no view of the fused QKV
projection (which would hold the query and key parts that rotary embedding already copied).

Oracle: the MLP's minimum counted from its shapes (fc1's input [T, h], fc1's output
[T, 2f] from which the backward recomputes the activation, fc2's input [T, f]); for the
attention, the projection's output storage itself. megatron-core's swiglu function against
F.silu(gate) * up by autograd, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.support.distributed import run_distributed
from tests.support.tolerances import rounding

TOKENS = 24


def test_megatron_cores_swiglu_runs_uncompiled_and_equals_autograds():
    from megatron.core.fusions import fused_bias_swiglu

    from adadpo_megatron.mcore import cpu_compat

    cpu_compat.enable()
    for name in ("swiglu", "swiglu_back", "bias_swiglu", "bias_swiglu_back"):
        assert not hasattr(getattr(fused_bias_swiglu, name), "_torchdynamo_orig_callable"), name
    torch.manual_seed(0)
    x = torch.randn(TOKENS, 2, 32, dtype=torch.float32) * 3
    grad = torch.randn(TOKENS, 2, 16)
    got_x = x.clone().requires_grad_()
    got = fused_bias_swiglu.bias_swiglu_impl(got_x, None)
    got.backward(grad)
    want_x = x.clone().requires_grad_()
    gate, up = torch.chunk(want_x, 2, dim=-1)
    want = F.silu(gate) * up
    want.backward(grad)
    # a handful of roundings per element on either side (sigmoid, two or three products,
    # the sum 1 + g (1 - s)), each relative to the magnitude of what it combines
    s = torch.sigmoid(gate.detach())
    up_ = up.detach()
    magnitude = [want.detach().abs(),
                 torch.cat([(grad * up_).abs() * s * (1 + gate.detach().abs()),
                            (grad * F.silu(gate.detach())).abs()], dim=-1)]
    for a, b, m in ((got, want, magnitude[0]), (got_x.grad, want_x.grad, magnitude[1])):
        assert ((a.detach() - b.detach()).abs() <= rounding(8) * m).all()

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
