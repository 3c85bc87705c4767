"""LogProbOutputProcessor inside megatron-core's TP regions against the unfused path, and the
clear error where GPTModel has no output_processor hook."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from adadpo_megatron import vocab_parallel_logprobs  # megatron-core's TP group by default
from tests.ops.test_fused_logprobs import S, V, problem, unfused
from tests.support.distributed import run_distributed


def _tp_worker(rank, world, sequence_parallel):
    import megatron.core.tensor_parallel.mappings  # noqa: F401 - redirected to the CPU below
    from megatron.core import parallel_state

    from adadpo_megatron.mcore import cpu_compat
    from adadpo_megatron.mcore.forward_step import LogProbOutputProcessor

    cpu_compat.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        hidden, weight, labels, grad_out = problem()
        want, want_h, want_w = unfused(hidden, weight, labels, grad_out)
        shard = V // world
        w = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        layer = torch.nn.Module()
        layer.weight, layer.sequence_parallel = w, sequence_parallel
        if sequence_parallel:  # each rank holds its slice of the sequence
            h = hidden[rank * S // world:(rank + 1) * S // world].clone().requires_grad_()
        else:
            h = hidden.clone().requires_grad_()
        got = LogProbOutputProcessor(chunk_size=4)(hidden_states=h, output_layer=layer,
                                                   output_weight=None, context=labels)
        got.backward(grad_out)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), want_w[rank * shard:(rank + 1) * shard],
                                   rtol=1e-5, atol=1e-5)
        expected_h = want_h[rank * S // world:(rank + 1) * S // world] if sequence_parallel \
            else want_h
        torch.testing.assert_close(h.grad.double(), expected_h, rtol=1e-5, atol=1e-5)
        # the unfused path on the same shards gives the same log-probs
        logits = (hidden @ weight[rank * shard:(rank + 1) * shard].t()).transpose(0, 1)
        torch.testing.assert_close(vocab_parallel_logprobs(logits, labels), got, rtol=1e-6,
                                   atol=1e-6)
        assert dist.get_world_size() == world
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["sp_off", "sp_on"])
def test_tp2_matches_unfused(sequence_parallel):
    run_distributed(_tp_worker, 2, sequence_parallel)


def test_a_megatron_without_the_hook_is_a_clear_error(monkeypatch):
    from megatron.core.models.gpt import GPTModel

    from adadpo_megatron.mcore.forward_step import require_output_processor_hook

    require_output_processor_hook()  # megatron-core 0.19 has it

    def old_forward(self, input_ids, position_ids, attention_mask, labels=None):
        raise AssertionError("not called")

    monkeypatch.setattr(GPTModel, "forward", old_forward)
    with pytest.raises(RuntimeError, match="needs GPTModel's output_processor hook, which "
                                           "megatron-core .* does not have"):
        require_output_processor_hook()
