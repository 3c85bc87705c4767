"""Training on packed and longest-padded micro-batches against padded rows (data.packing=none).

Oracle: the single-process run on padded rows. The gradient is the mean over the global
batch's pairs, so however the pairs are packed, spread over micro-batches and ranks, the step
(loss, grad norm, every parameter) must be the same up to float rounding. seq_length 64 with
the shipped pairs (about 20 tokens each) packs several sequences into every row.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.tolerances import (
    U,
    dpo_loss_gap,
    gap,
    gradient_gap,
    logp_sum_gap,
    sgd_weight_gap,
)
from tests.support.training import (
    DATA,
    run_steps,
    tiny_config,
    tiny_depth,
    tiny_eval_gaps,
    tiny_training_gaps,
)

pytestmark = pytest.mark.slow

PACKED = {"data.seq_length": 64, "data.max_prompt_length": 32}
LAYOUTS = {
    "single": (1, {}),
    "tp2": (2, {"parallel.tensor_model_parallel_size": 2}),
    "pp2": (2, {"parallel.pipeline_model_parallel_size": 2}),
    "pp2_vpp2": (2, {"parallel.pipeline_model_parallel_size": 2,
                     "parallel.virtual_pipeline_model_parallel_size": 2}),
    "dp2": (2, {}),
    "tp2_fused": (2, {"parallel.tensor_model_parallel_size": 2, "model.fused_logprobs": True}),
}


def _modes_worker(rank, world, overrides, modes, out_path):
    results = {}
    for mode in modes:
        config = tiny_config({**PACKED, **overrides, "data.packing": mode})
        results[mode] = run_steps(config, steps=1)
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    out = tmp_path_factory.mktemp("padded") / "none.pt"
    run_distributed(_modes_worker, 1, {}, ("none",), str(out))
    return torch.load(out, weights_only=False)["none"]


def assert_same_step(got, want, step=0):
    """Step ``step`` of two runs (its metrics, the weights after it) agrees within float32
    rounding: the bounds of tests/support/tolerances.py from ``want``'s metrics (sums of <= 64
    token log-probs through a forward pass of ~2,000 roundings, the gradient over the batch,
    clipped SGD steps)."""
    (history, params), (want_history, want_params) = got, want
    gaps, weights = tiny_training_gaps(want_history[:step + 1], seq_length=64)
    for key in ("loss", "grad_norm", "rewards/margins", "adadpo/coef_mean", "logps/chosen"):
        assert history[step][key] == pytest.approx(want_history[step][key],
                                                   abs=gaps[step][key]), key
    for key in ("pairs", "tokens"):  # counts
        assert history[step][key] == want_history[step][key], key
    assert params.keys() == want_params.keys()
    for name, value in want_params.items():
        # rtol: each weight's own update rounds, at most U |w| a step
        torch.testing.assert_close(params[name], value, rtol=(step + 1) * U, atol=weights,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pack_and_longest_train_as_padded_rows(layout, padded, tmp_path):
    world, overrides = LAYOUTS[layout]
    out = tmp_path / "modes.pt"
    run_distributed(_modes_worker, world, overrides, ("pack", "longest"), str(out))
    results = torch.load(out, weights_only=False)
    for mode, (history, params) in results.items():
        assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6), mode
        assert_same_step((history, params), padded)
    pack, none = (results["pack"][0][0]["data/real_token_fraction"],
                  padded[0][0]["data/real_token_fraction"])
    assert pack > 1.5 * none, (pack, none)  # several sequences share a row


# Issue 17: large micro-batch sizes and explicit token budgets. 8 pairs of about 40 tokens at
# seq_length 64 fill 5 or 6 rows, far fewer than 2 x micro_batch_size; the interleaved
# schedule still gets a multiple of PP micro-batches.
BUDGETS = {
    "single_mbs8": (1, {"train.micro_batch_size": 8}),
    "dp2_mbs4": (2, {"train.micro_batch_size": 4}),
    "tp2_mbs8_fused": (2, {"parallel.tensor_model_parallel_size": 2,
                           "train.micro_batch_size": 8, "model.fused_logprobs": True}),
    "pp2_vpp2_mbs8": (2, {"parallel.pipeline_model_parallel_size": 2,
                          "parallel.virtual_pipeline_model_parallel_size": 2,
                          "train.micro_batch_size": 8}),
    "pp2_budget_2rows": (2, {"parallel.pipeline_model_parallel_size": 2,
                             "data.max_tokens_per_micro_batch": 128}),
}


@pytest.mark.parametrize("layout", list(BUDGETS))
def test_pack_at_any_micro_batch_size_trains_as_padded_rows(layout, padded, tmp_path):
    world, overrides = BUDGETS[layout]
    out = tmp_path / "pack.pt"
    run_distributed(_modes_worker, world, overrides, ("pack",), str(out))
    history, params = torch.load(out, weights_only=False)["pack"]
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert_same_step((history, params), padded)
    fraction = history[0]["data/real_token_fraction"]
    assert fraction > 0.8 > 2 * padded[0][0]["data/real_token_fraction"], fraction


def _sft_and_eval_worker(rank, world, out_path):
    results = {}
    for mode in ("none", "pack"):
        sft = tiny_config({**PACKED, "data.packing": mode, "train.stage": "sft",
                           "reference.mode": "none", "data.eval_fraction": 0.05})
        from adadpo_megatron.training.trainer import Trainer

        trainer = Trainer(sft).setup()
        try:
            step = trainer.train_step(0)
            held_out = trainer.evaluate()
        finally:
            trainer.close()
        preference = tiny_config({**PACKED, "data.packing": mode, "data.eval_fraction": 0.05})
        trainer = Trainer(preference).setup()
        try:
            preference_step = trainer.train_step(0)
            preference_eval = trainer.evaluate()
        finally:
            trainer.close()
        results[mode] = (step, held_out, preference_eval, preference_step)
    torch.save(results, out_path)


def test_sft_and_evaluation_pack_as_padded_rows(tmp_path):
    out = tmp_path / "sft.pt"
    run_distributed(_sft_and_eval_worker, 1, str(out))
    results = torch.load(out, weights_only=False)
    (step, held, pref, _), (want_step, want_held, want_pref, want_pref_step) = (
        results["pack"], results["none"])
    # float32 rounding's bounds (tests/support/tolerances.py) from the padded run's metrics.
    # SFT: the loss is a mean of the batch's token log-probs (the same relative gap as their
    # sum), the gradient rounds as over the batch; one clipped SGD step apart, the held-out
    # NLL moves by at most its gradient's norm (estimated by the training one's) times the
    # weights' gap.
    depth, positions = tiny_depth(64), 2 * int(want_step["pairs"]) * 64
    sft_gradient = gradient_gap(want_step["grad_norm"], positions, depth)
    sft_weights = sgd_weight_gap(0.5, [want_step["grad_norm"]], [sft_gradient], clip=1.0)
    assert step["loss"] == pytest.approx(want_step["loss"],
                                         abs=gap(positions + depth, want_step["loss"]))
    assert step["grad_norm"] == pytest.approx(want_step["grad_norm"], abs=sft_gradient)
    assert step["tokens"] == want_step["tokens"]
    held_gap = (gap(2 * int(want_held["eval/pairs"]) * 64 + depth, want_held["eval/loss"])
                + want_step["grad_norm"] * sft_weights)
    # preference: the evaluation's DPO metrics one DPO step from equal weights
    pref_gaps = tiny_eval_gaps([want_pref_step], want_pref, seq_length=64)
    for got, want, bounds in ((held, want_held, {"eval/loss": held_gap,
                                                 "eval/nll/chosen": held_gap}),
                              (pref, want_pref, pref_gaps)):
        assert got.keys() == want.keys() and got
        for key, value in want.items():
            if key in bounds:
                assert got[key] == pytest.approx(value, abs=bounds[key]), key
            else:  # counts, and fractions of pairs (a pair's margin or coefficient would have
                # to be within rounding of 0 or C to flip): equal
                assert got[key] == value, key
    assert step["data/real_token_fraction"] > 1.5 * want_step["data/real_token_fraction"]


def _precompute_worker(rank, world, data, cache):
    from adadpo_megatron.training.precompute import precompute_reference

    precompute_reference(tiny_config({**PACKED, "data.path": data, "data.packing": "none",
                                      "reference.mode": "precompute",
                                      "reference.cache_path": cache}))


def _reference_worker(rank, world, data, cache, out_path):
    results = {}
    for mode in ("precompute", "resident"):
        config = tiny_config({**PACKED, "data.path": data, "data.packing": "pack",
                              "reference.mode": mode, "reference.cache_path": cache})
        results[mode] = run_steps(config, steps=2)
    torch.save(results, out_path)


def test_packed_step_zero_is_ln2_with_precomputed_and_resident_references(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(DATA.read_text().splitlines()[:48]) + "\n")
    cache = str(tmp_path / "pairs.reference.pt")
    # the cache is per example: written from padded rows, read by packed training
    run_distributed(_precompute_worker, 1, str(data), cache)
    out = tmp_path / "ref.pt"
    run_distributed(_reference_worker, 1, str(data), cache, str(out))
    results = torch.load(out, weights_only=False)
    # resident: the reference's sums are the policy's own computation, so z = 0 and the loss
    # is ln 2 exactly (but for ln 2's float32 rounding). Precomputed on padded rows, they
    # differ from the packed policy's by rounding: z by beta (C + 1) times a sum's gap, the
    # loss by half that (|d loss / dz| = 1/2 at z = 0)
    step = results["resident"][0][0]
    sums = {side: logp_sum_gap(step[f"logps/{side}"], 64, tiny_depth(64))
            for side in ("chosen", "rejected")}
    cached = dpo_loss_gap(0.5, sums["chosen"], sums["rejected"], reference=False, clip=2.0,
                          loss=math.log(2.0), log_ratio=0.0)
    for mode, bound in (("resident", 1e-6), ("precompute", cached)):
        assert results[mode][0][0]["loss"] == pytest.approx(math.log(2.0), abs=bound), mode
    assert_same_step(results["precompute"], results["resident"], step=1)


def _resume_worker(rank, world, out_dir, result_path):
    from adadpo_megatron.training.trainer import Trainer

    def train(**overrides):
        config = tiny_config({**PACKED, "data.packing": "pack", "optimizer.optimizer": "adam",
                              "optimizer.lr": 1e-3, "train.output_dir": out_dir, **overrides})
        trainer = Trainer(config).setup()
        try:
            return trainer.start_step, trainer.train()
        finally:
            trainer.close()

    _, straight = train(**{"train.max_steps": 4, "train.save_interval": 2,
                           "train.keep_checkpoints": 3})
    with open(os.path.join(out_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_0000002\n")
    start, resumed = train(**{"train.max_steps": 4})
    if rank == world - 1:
        torch.save({"straight": straight, "start": start, "resumed": resumed}, result_path)


@pytest.mark.parametrize("world", [1, 2], ids=["single", "dp2"])
def test_packed_resume_continues_exactly(tmp_path, world):
    out = tmp_path / "resume.pt"
    run_distributed(_resume_worker, world, str(tmp_path / "run"), str(out))
    result = torch.load(out, weights_only=False)
    assert result["start"] == 2
    for got, want in zip(result["resumed"], result["straight"][2:], strict=True):
        for key in ("loss", "grad_norm", "data/real_token_fraction"):
            assert got[key] == want[key], (key, got[key], want[key])
