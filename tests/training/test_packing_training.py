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
from tests.support.training import DATA, run_steps, tiny_config

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


def assert_same_step(got, want, rtol=1e-5):
    (history, params), (want_history, want_params) = got, want
    for key in ("loss", "grad_norm", "rewards/margins", "adadpo/coef_mean", "logps/chosen",
                "pairs", "tokens"):
        assert history[0][key] == pytest.approx(want_history[0][key], rel=rtol, abs=1e-7), key
    assert params.keys() == want_params.keys()
    for name, value in want_params.items():
        torch.testing.assert_close(params[name], value, rtol=rtol, atol=1e-5,
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
            trainer.train_step(0)
            preference_eval = trainer.evaluate()
        finally:
            trainer.close()
        results[mode] = (step, held_out, preference_eval)
    torch.save(results, out_path)


def test_sft_and_evaluation_pack_as_padded_rows(tmp_path):
    out = tmp_path / "sft.pt"
    run_distributed(_sft_and_eval_worker, 1, str(out))
    results = torch.load(out, weights_only=False)
    (step, held, pref), (want_step, want_held, want_pref) = results["pack"], results["none"]
    for key in ("loss", "grad_norm", "tokens"):
        assert step[key] == pytest.approx(want_step[key], rel=1e-5), key
    for got, want in ((held, want_held), (pref, want_pref)):
        assert got.keys() == want.keys() and got
        for key, value in want.items():
            # margins are differences of nearly equal float32 rewards: an absolute bound too
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
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
    for mode, (history, _) in results.items():
        assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6), mode
    assert_same_step(([results["precompute"][0][1]], results["precompute"][1]),
                     ([results["resident"][0][1]], results["resident"][1]))


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
