"""The interleaved pipeline schedule evaluates and runs the reference in every packing mode
(issue 23, item 9).

Before: PP 2 x VPP 2 with data.packing none or longest crashed at the first evaluation
(megatron-core: "The remainder of M ... should be 0"): 5 held-out pairs made 3 micro-batches;
with reference.mode resident and longest it crashed at step 0, in the reference pass, which
ran the schedule once per group of equal-shape micro-batches. Now pipeline stages always
exchange shapes and an evaluation is padded with filler micro-batches that count for
nothing. Oracle: the same evaluation on one process, which needs no padding.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.tolerances import logp_sum_gap
from tests.support.training import tiny_config, tiny_depth, tiny_eval_gaps, tiny_training_gaps

pytestmark = pytest.mark.slow

INTERLEAVED = {"parallel.pipeline_model_parallel_size": 2,
               "parallel.virtual_pipeline_model_parallel_size": 2}
# 1000 shipped pairs: 5 held out, so two pairs a micro-batch make 3 micro-batches
COMMON = {"data.eval_fraction": 0.005, "reference.mode": "resident"}


def _worker(rank, world, overrides, out_path):
    from adadpo_megatron.training.trainer import Trainer

    results = {}
    for mode in ("none", "longest", "pack"):
        trainer = Trainer(tiny_config({**COMMON, **overrides, "data.packing": mode})).setup()
        try:
            step = trainer.train_step(0)
            held_out = trainer.evaluate()
        finally:
            trainer.close()
        results[mode] = (step, held_out)
    if trainer.is_logging_rank:
        torch.save(results, out_path)


def test_interleaved_pipeline_evaluates_as_one_process(tmp_path):
    outcomes = {}
    for name, world, overrides in (("one", 1, {}), ("vpp", 2, INTERLEAVED)):
        out = tmp_path / f"{name}.pt"
        run_distributed(_worker, world, overrides, str(out))
        outcomes[name] = torch.load(out, weights_only=False)
    for mode, (step, held_out) in outcomes["vpp"].items():
        want_step, want_held = outcomes["one"][mode]
        assert held_out["eval/pairs"] == want_held["eval/pairs"] == 5, mode  # fillers: none
        # within float32 rounding of the two layouts (tests/support/tolerances.py): the step
        # from its sums and gradient, the evaluation one SGD step later
        gaps, _ = tiny_training_gaps([want_step])
        assert step["loss"] == pytest.approx(want_step["loss"], abs=gaps[0]["loss"]), mode
        bounds = tiny_eval_gaps([want_step], want_held)
        assert held_out.keys() == want_held.keys()
        for key, value in want_held.items():
            if key in bounds:
                assert held_out[key] == pytest.approx(value, abs=bounds[key]), (mode, key)
            else:  # counts and fractions of pairs: equal
                assert held_out[key] == value, (mode, key)


def _precompute_worker(rank, world, overrides, cache):
    from adadpo_megatron.training.precompute import precompute_reference

    precompute_reference(tiny_config({**overrides, "reference.mode": "precompute",
                                      "reference.cache_path": cache}))


def test_precompute_runs_on_the_interleaved_schedule_as_on_one_process(tmp_path):
    """The reference pass used to run one micro-batch per schedule call, which the interleaved
    schedule refuses; it now plans as training does (here packed, with fillers where a call's
    pairs run short). Oracle: one process, padded rows."""
    caches = {}
    for name, world, overrides in (("one", 1, {"data.packing": "none"}),
                                   ("vpp", 2, {**INTERLEAVED, "data.packing": "pack"})):
        caches[name] = tmp_path / f"{name}.reference.pt"
        run_distributed(_precompute_worker, world, overrides, str(caches[name]))
    one, vpp = (torch.load(caches[n], weights_only=True) for n in ("one", "vpp"))
    assert torch.equal(one["example_ids"], vpp["example_ids"])
    assert torch.equal(one["counts"], vpp["counts"])
    # each sum over <= 24 response tokens through the tiny model's forward pass, packed or
    # padded: within float32 rounding of its size (tests/support/tolerances.py)
    bound = logp_sum_gap(one["logps"].abs().max().item(), 24, tiny_depth(24))
    torch.testing.assert_close(vpp["logps"], one["logps"], rtol=0, atol=bound)
