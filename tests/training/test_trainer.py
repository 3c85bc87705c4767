"""AdaDPO through megatron-core's real schedules, against the single-process run.

Every test runs a tiny GPTModel (float32, no dropout, fixed seed) for real: megatron-core's
pipeline schedules, DDP, optimizer and finalize_model_grads on gloo, via the CPU layer.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.training import run_steps, tiny_config

# every test here spawns processes or runs training steps
pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": {"parallel.tensor_model_parallel_size": 2},
    "pp2": {"parallel.pipeline_model_parallel_size": 2},
    "dp2": {},
    "pp2_vpp2": {"parallel.pipeline_model_parallel_size": 2,
                 "parallel.virtual_pipeline_model_parallel_size": 2},
    # the fused hidden-to-log-prob path, against the unfused single-process run
    "tp2_fused": {"parallel.tensor_model_parallel_size": 2, "model.fused_logprobs": True},
    "pp2_fused": {"parallel.pipeline_model_parallel_size": 2, "model.fused_logprobs": True},
}


def _run_worker(rank, world, overrides, out_path, steps=1):
    history, params = run_steps(tiny_config(overrides), steps)
    if rank == 0:
        torch.save({"history": history, "params": params}, out_path)


def run(tmp_path, name, world, overrides, steps=1):
    out = tmp_path / f"{name}.pt"
    run_distributed(_run_worker, world, overrides, str(out), steps)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", 1, {})


def assert_same_step(result, expected, rtol=1e-5):
    got, want = result["history"][0], expected["history"][0]
    assert got["loss"] == pytest.approx(want["loss"], rel=rtol)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=rtol)
    for key in ("rewards/margins", "adadpo/coef_mean", "logps/chosen"):
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-7), key
    assert got["pairs"] == want["pairs"] == 8
    assert result["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=rtol, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, single, tmp_path):
    result = run(tmp_path, layout, 2, LAYOUTS[layout])
    # step 0, reference = policy: ln 2 exactly, on every layout
    assert result["history"][0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert_same_step(result, single)


def test_single_process_step_zero_is_ln2_and_moves(single):
    step = single["history"][0]
    assert step["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert step["grad_norm"] > 0


def _micro_batch_worker(rank, world, out_path):
    results = {}
    for micro in (1, 2, 4):
        config = tiny_config({"train.global_batch_size": 4, "train.micro_batch_size": micro})
        results[micro] = run_steps(config)
    torch.save(results, out_path)


def test_micro_batch_size_and_count_do_not_change_the_step(tmp_path):
    """1 x 4, 2 x 2 and 4 x 1 pairs: the same loss, gradients and parameters."""
    out = tmp_path / "mb.pt"
    run_distributed(_micro_batch_worker, 1, str(out))
    results = torch.load(out, weights_only=False)
    expected = {"history": results[4][0], "params": results[4][1]}
    for micro in (1, 2):
        got = {"history": results[micro][0], "params": results[micro][1]}
        assert got["history"][0]["pairs"] == 4
        got["history"][0]["pairs"] = expected["history"][0]["pairs"] = 8
        assert_same_step(got, expected)


def _unequal_lengths_data(path):
    """The shipped pairs with rejected responses 0-2 characters longer (R-DPO needs n_w != n_l)."""
    import json

    from tests.support.training import DATA

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:64]]
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "rejected": row["rejected"] + "z" * (i % 3)}) + "\n")


def _loss_type_worker(rank, world, out_path):
    """For every loss type: the step's reported loss vs preference_loss on independent logps."""
    from adadpo_megatron.data.micro_batches import collate
    from adadpo_megatron.ops.loss import preference_loss
    from adadpo_megatron.ops.loss_config import LossConfig
    from adadpo_megatron.training.trainer import Trainer

    report = {}
    for loss_type in ("dpo", "ipo", "simpo", "rdpo", "cpo", "orpo"):
        loss = LossConfig(loss_type=loss_type, beta=0.5, rdpo_alpha=0.01).__dict__
        needs_reference = loss_type in ("dpo", "ipo", "rdpo")
        data = out_path + ".jsonl"
        _unequal_lengths_data(data)
        config = tiny_config({f"loss.{k}": v for k, v in loss.items()},
                             **{"reference.mode": "resident" if needs_reference else "none",
                                "data.path": data})
        trainer = Trainer(config).setup()
        # perturb the policy so that it differs from the reference
        with torch.no_grad():
            for chunk in trainer.model:
                for p in chunk.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        def sums(model, batch):
            with torch.no_grad():
                logits = model(batch["tokens"], batch["position_ids"], None).double()
            logp = torch.log_softmax(logits, -1)
            safe = batch["labels"].clamp(min=0)
            token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * batch["loss_mask"]
            return token.sum(-1), batch["loss_mask"].sum(-1)

        # the step's pairs, as one batch, through plain full-vocab float64 log_softmax
        batches, _ = trainer.micro_batches(0)
        ids = torch.cat([b["example_ids"] for b in batches])
        batch = collate(trainer.dataset, ids)
        policy, counts = sums(trainer.model[0].module, batch)
        ref = sums(trainer.reference_model[0], batch)[0] if needs_reference else None
        p = 8
        args = (policy[:p], policy[p:], counts[:p], counts[p:])
        if ref is not None:
            args += (ref[:p], ref[p:])
        expected, _ = preference_loss(*args, config=config.loss)
        metrics = trainer.train_step(0)
        report[loss_type] = (metrics["loss"], expected.mean().item())
        trainer.close()
    torch.save(report, out_path)


def test_every_loss_type_through_the_real_step(tmp_path):
    out = tmp_path / "losses.pt"
    run_distributed(_loss_type_worker, 1, str(out))
    report = torch.load(out)
    assert set(report) == {"dpo", "ipo", "simpo", "rdpo", "cpo", "orpo"}
    values = []
    for loss_type, (reported, expected) in report.items():
        assert reported == pytest.approx(expected, rel=1e-5), loss_type
        values.append(reported)
    assert len({round(v, 6) for v in values}) == len(values), "two loss types gave one loss"
