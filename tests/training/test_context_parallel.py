"""Context parallelism through adadpo-train, against the single-process run (issue 26).

On CPU the attention is the local context-parallel one (adadpo_megatron.mcore.
context_parallel_attention); everything else is megatron-core's: the load-balanced split of
rows, the rotary table cut to each rank's chunks, DDP over data x context parallelism. Oracle:
the same config on one process. The gradient is the mean over the global batch's pairs
however their tokens are spread, so two steps (loss, grad norm, every weight after them)
must agree within float32 rounding: the bounds of tests/support/tolerances.py from the
single-process run's metrics. Under CP every packed segment is padded to 2 x CP tokens, so
packed rows differ from the single process's; the per-sequence sums do not.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.tolerances import U
from tests.support.training import tiny_config, tiny_eval_gaps, tiny_training_gaps

CP2 = {"parallel.context_parallel_size": 2}
STEPS = 2
# name: (world, CP layout, what the run and its single-process oracle share)
CASES = {
    "cp2_padded_rows": (2, CP2, {"data.packing": "none"}),
    "cp2_packed_precompute": (2, CP2, {"reference.mode": "precompute"}),
    "cp2_tp2_packed_fused": (4, {**CP2, "parallel.tensor_model_parallel_size": 2},
                             {"model.fused_logprobs": True}),
    "cp2_pp2_longest": (4, {**CP2, "parallel.pipeline_model_parallel_size": 2},
                        {"data.packing": "longest", "data.eval_fraction": 0.005}),
}


def _worker(rank, world, overrides, out_path):
    from adadpo_megatron.training.precompute import precompute_reference
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import gather_full_parameters

    config = tiny_config(overrides)
    if config.reference.mode == "precompute":
        precompute_reference(config)
    trainer = Trainer(config).setup()
    try:
        history = [trainer.train_step(step) for step in range(STEPS)]
        held_out = trainer.evaluate() if config.data.eval_fraction else None
        params = gather_full_parameters(trainer)
    finally:
        trainer.close()
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, (history, held_out))
    if rank == 0:  # the metrics are complete on the last pipeline stage
        history, held_out = max(everyone, key=lambda h: len(h[0][0]))
        torch.save({"history": history, "held_out": held_out, "params": params}, out_path)


def _run(tmp_path, name, world, overrides):
    out = tmp_path / f"{name}.pt"
    run_distributed(_worker, world, overrides, str(out), timeout=300)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_training_equals_one_process(case, tmp_path):
    world, layout, shared = CASES[case]
    want = _run(tmp_path, "one", 1, shared)
    got = _run(tmp_path, "cp", world, {**shared, **layout})
    history, want_history = got["history"], want["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    gaps, weights = tiny_training_gaps(want_history)
    for step in range(STEPS):
        for key in ("loss", "grad_norm", "rewards/margins", "adadpo/coef_mean",
                    "logps/chosen"):
            assert history[step][key] == pytest.approx(want_history[step][key],
                                                       abs=gaps[step][key]), (step, key)
        for key in ("pairs", "tokens"):  # counts: each pair once, not once per CP rank
            assert history[step][key] == want_history[step][key], (step, key)
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        # rtol: each weight's own update rounds, at most U |w| a step
        torch.testing.assert_close(got["params"][name], value, rtol=STEPS * U, atol=weights,
                                   msg=lambda m, n=name: f"{n}: {m}")
    if want["held_out"] is not None:
        bounds = tiny_eval_gaps(want_history, want["held_out"])
        assert got["held_out"]["eval/pairs"] == want["held_out"]["eval/pairs"]
        for key, bound in bounds.items():
            assert got["held_out"][key] == pytest.approx(want["held_out"][key],
                                                         abs=bound), key


def test_a_sequence_length_the_chunks_cannot_split_is_refused():
    with pytest.raises(ValueError, match=r"data.seq_length\(26\) is not divisible by 2 \* "
                                         r"parallel.context_parallel_size\(2\)"):
        tiny_config({**CP2, "data.seq_length": 26})


def test_a_token_budget_the_chunks_cannot_split_is_refused():
    with pytest.raises(ValueError, match=r"data.max_tokens_per_micro_batch\(50\) is not "
                                         r"divisible by 2 \* parallel.context_parallel_size"):
        tiny_config({**CP2, "data.max_tokens_per_micro_batch": 50})
