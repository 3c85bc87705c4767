"""LoRA adapters on megatron-core's column- and row-parallel linears at TP = 2, with and without
sequence parallelism, against y = x W^T + scale * x A^T B^T on full tensors in one process.

Sequence parallelism cannot run in a whole model on CPU (megatron-core's torch norm refuses
it), so this is where its communication (gather / reduce-scatter of A x, the TP sum of the
replicated factor's gradient that finalize_model_grads does) is checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support.distributed import run_distributed

S, B, IN, OUT, RANK = 8, 2, 12, 16, 3


def _problem():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64)
            for name, shape in (("x", (S, B, IN)), ("w", (OUT, IN)), ("a", (RANK, IN)),
                                ("b", (OUT, RANK)), ("grad", (S, B, OUT)))}


def _reference(p, scale):
    """(y, dL/dx, dL/dA, dL/dB) for L = sum(y * grad), full tensors, autograd."""
    x, a, b = (p[k].clone().requires_grad_() for k in ("x", "a", "b"))
    y = x @ p["w"].T + scale * (x @ a.T) @ b.T
    y.backward(p["grad"])
    return y.detach(), x.grad, a.grad, b.grad


def _worker(rank, world, kind, sequence_parallel):
    import megatron.core.tensor_parallel.mappings  # noqa: F401 - redirected to the CPU below
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from adadpo_megatron.mcore import cpu_compat
    from adadpo_megatron.mcore.lora import LoRAConfig, attach_adapter

    cpu_compat.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        p = _problem()
        lora = LoRAConfig(rank=RANK, alpha=6.0, target_modules=["linear_qkv"])
        want_y, want_x, want_a, want_b = _reference(p, lora.scale)
        config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=2,
                                   tensor_model_parallel_size=world,
                                   sequence_parallel=sequence_parallel,
                                   use_cpu_initialization=True, params_dtype=torch.float64,
                                   gradient_accumulation_fusion=False)
        seq = slice(rank * S // world, (rank + 1) * S // world)
        rows = slice(rank * OUT // world, (rank + 1) * OUT // world)
        cols = slice(rank * IN // world, (rank + 1) * IN // world)
        parent = torch.nn.Module()
        if kind == "column":
            parent.linear_qkv = ColumnParallelLinear(
                IN, OUT, config=config, init_method=torch.nn.init.zeros_, bias=False,
                gather_output=False)
            weight, x = p["w"][rows], p["x"][seq] if sequence_parallel else p["x"]
            name, a, b = "linear_qkv", p["a"], p["b"][rows]
            out_slice = (slice(None), slice(None), rows)
            x_slice = (seq,) if sequence_parallel else (slice(None),)
        else:
            parent.linear_proj = RowParallelLinear(
                IN, OUT, config=config, init_method=torch.nn.init.zeros_, bias=False,
                input_is_parallel=True, skip_bias_add=True)
            weight, x = p["w"][:, cols], p["x"][..., cols]
            name, a, b = "linear_proj", p["a"][:, cols], p["b"]
            out_slice = (seq,) if sequence_parallel else (slice(None),)
            x_slice = (slice(None), slice(None), cols)
        with torch.no_grad():
            getattr(parent, name).weight.copy_(weight)
        getattr(parent, name).weight.requires_grad_(False)
        adapter = attach_adapter(parent, name, lora, sequence_parallel=sequence_parallel,
                                 tp_group=parallel_state.get_tensor_model_parallel_group())
        with torch.no_grad():
            adapter.lora_a.copy_(a)
            adapter.lora_b.copy_(b)
        x = x.clone().requires_grad_()
        y, _ = getattr(parent, name)(x)
        y.backward(want_y.new_tensor(p["grad"][out_slice]))
        # what finalize_model_grads does for parameters marked sequence_parallel
        for param in (adapter.lora_a, adapter.lora_b):
            if getattr(param, "sequence_parallel", False):
                dist.all_reduce(param.grad,
                                group=parallel_state.get_tensor_model_parallel_group())
        torch.testing.assert_close(y, want_y[out_slice])
        torch.testing.assert_close(x.grad, want_x[x_slice])
        if kind == "column":
            torch.testing.assert_close(adapter.lora_a.grad, want_a)
            torch.testing.assert_close(adapter.lora_b.grad, want_b[rows])
        else:
            torch.testing.assert_close(adapter.lora_a.grad, want_a[:, cols])
            torch.testing.assert_close(adapter.lora_b.grad, want_b)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["sp_off", "sp_on"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_tp2_adapter_equals_the_full_computation(kind, sequence_parallel):
    run_distributed(_worker, 2, kind, sequence_parallel)


def test_alpha_follows_the_rank_unless_set():
    """model.lora.alpha unset: 2 x rank, a scale of 2 at any rank (rank 16 keeps the former
    default alpha 32); set, it is taken as it is."""
    from adadpo_megatron.mcore.lora import LoRAConfig

    assert [LoRAConfig(rank=r).scale for r in (4, 16, 64)] == [2.0, 2.0, 2.0]
    assert LoRAConfig(rank=16).alpha == 32.0
    assert LoRAConfig(rank=4, alpha=6.0).alpha == 6.0
