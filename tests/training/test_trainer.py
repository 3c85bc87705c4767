"""AdaDPO through megatron-core's real schedules, against the single-process run.

Every test runs a tiny GPTModel (float32, no dropout, fixed seed) for real: megatron-core's
pipeline schedules, DDP, optimizer and finalize_model_grads on gloo, via the CPU layer.
"""

from __future__ import annotations

import math

import pytest
import torch

from adadpo_megatron.ops.loss_config import LOSS_TYPES, NOT_ADAPTIVE, LossConfig
from tests.support.distributed import run_distributed
from tests.support.tolerances import U, loss_slope, rounding
from tests.support.training import run_steps, tiny_config, tiny_training_gaps

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


def assert_same_step(result, expected):
    """One step of two runs agrees within float32 rounding: the bounds of
    tests/support/tolerances.py from the expected run's metrics (sums of <= 24 token
    log-probs through a forward pass of ~1,700 roundings, a gradient over the batch, one
    clipped SGD step; seen ~100 times below them)."""
    got, want = result["history"][0], expected["history"][0]
    gaps, weights = tiny_training_gaps(expected["history"][:1])
    for key in ("loss", "grad_norm", "rewards/margins", "adadpo/coef_mean", "logps/chosen"):
        assert got[key] == pytest.approx(want[key], abs=gaps[0][key]), key
    assert got["pairs"] == want["pairs"] == 8
    assert result["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        # rtol: each weight's own update rounds, at most U |w|
        torch.testing.assert_close(result["params"][name], value, rtol=U, atol=weights,
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


# Every loss type alone (valid settings: the label smoothing exo_pair needs, adaptive off
# where it is refused), LD-DPO, WPO and TRL's MPO mix.
LOSS_CASES = {t: {"loss_type": t} for t in LOSS_TYPES}
LOSS_CASES.update({
    "ld_dpo": {"loss_type": "dpo", "ld_alpha": 0.5},
    "wpo": {"loss_type": "sigmoid", "use_weighting": True, "adaptive": False},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0],
            "nll_reduction": "token"},
})


def loss_section(case):
    loss = {"beta": 0.5, "rdpo_alpha": 0.01, **case}
    types = loss["loss_type"] if isinstance(loss["loss_type"], list) else [loss["loss_type"]]
    if types[0] in ("exo_pair", "robust", "aot", "aot_unpaired"):
        loss["label_smoothing"] = 0.1
    if set(types) & set(NOT_ADAPTIVE):
        loss["adaptive"] = False
    return loss


def _independent_statistics(model, batch, ld_alpha):
    """Per-sequence sums of a rows micro-batch through plain full-vocab float64 log_softmax:
    (sums, counts, LD tails (sums, counts), WPO's mean of log p - log sum p^2)."""
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None).double()
    logp = torch.log_softmax(logits, -1)
    safe = batch["labels"].clamp(min=0)
    mask = batch["loss_mask"].double()
    token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    counts = mask.sum(-1)
    pairs = counts.numel() // 2
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
    position = torch.cumsum(mask, -1)  # rows: one sequence each
    tail = mask * (position > shared[:, None])
    log_sum_sq = torch.log((torch.softmax(logits, -1) ** 2).sum(-1))
    wpo = ((token - log_sum_sq * mask).sum(-1) / counts).exp()
    # the size of the terms of WPO's exponent, for its rounding
    wpo_terms = ((token.abs() + log_sum_sq.abs() * mask).sum(-1) / counts)
    return token.sum(-1), counts, ((token * tail).sum(-1), tail.sum(-1)), (wpo, wpo_terms)


def _loss_type_worker(rank, world, out_path):
    """For every case: the step's reported loss vs preference_loss on independent per-token
    statistics of each micro-batch (aot sorts within a micro-batch), and how far float32
    rounding lets them be apart: the model's logits are the same (one model, one batch), so
    the trainer's float32 log-softmax over 384 logits and sums over <= 24 tokens round, each
    off by rounding(408) of its size (tolerances.py), which moves the loss by its derivative
    with respect to each (autograd, float64), plus the loss's own float32 evaluation."""
    from adadpo_megatron.data.micro_batches import collate
    from adadpo_megatron.ops.loss import LengthTails, preference_loss
    from adadpo_megatron.ops.loss_config import LossConfig
    from adadpo_megatron.training.trainer import Trainer

    report = {}
    data = out_path + ".jsonl"
    _unequal_lengths_data(data)
    for name, case in LOSS_CASES.items():
        loss = LossConfig(**loss_section(case))
        config = tiny_config({f"loss.{k}": v for k, v in loss_section(case).items()},
                             **{"reference.mode": "resident" if loss.needs_reference else "none",
                                "data.path": data})
        trainer = Trainer(config).setup()
        # perturb the policy so that it differs from the reference
        with torch.no_grad():
            for chunk in trainer.model:
                for p in chunk.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        losses, bound = [], 0.0
        batches, _ = trainer.micro_batches(0)
        for micro in batches:
            batch = collate(trainer.run.data.dataset, micro["example_ids"])
            policy, counts, tails, (wpo, wpo_terms) = _independent_statistics(
                trainer.model[0].module, batch, loss.ld_alpha)
            m = counts.numel() // 2
            # (value, the size of its terms): each input of the loss that float32 rounds
            inputs = {"policy": (policy, policy.abs())}
            if loss.needs_reference:
                ref, _, ref_tails, _ = _independent_statistics(trainer.reference_model[0], batch,
                                                               loss.ld_alpha)
                size = ref.abs()
                if loss.ld_alpha is not None:
                    ref = ref - (1 - loss.ld_alpha) * ref_tails[0]
                inputs["ref"] = (ref, size)
            if loss.ld_alpha is not None:
                inputs["tails"] = (tails[0], tails[0].abs())
            if loss.use_weighting:  # exp(x): off by its exponent's rounding, relatively
                inputs["wpo"] = (wpo, wpo * wpo_terms)
            leaves = {k: v.clone().requires_grad_(True) for k, (v, _) in inputs.items()}
            args = [leaves["policy"][:m], leaves["policy"][m:], counts[:m], counts[m:]]
            if "ref" in leaves:
                args += [leaves["ref"][:m], leaves["ref"][m:]]
            extra = {}
            if "tails" in leaves:
                extra["tails"] = LengthTails(leaves["tails"][:m], leaves["tails"][m:],
                                             tails[1][:m], tails[1][m:])
            if "wpo" in leaves:
                extra["wpo_weights"] = (leaves["wpo"][:m], leaves["wpo"][m:])
            pair_losses = preference_loss(*args, config=loss, **extra)[0]
            slopes = torch.autograd.grad(pair_losses.sum(), list(leaves.values()),
                                         allow_unused=True)
            for (_, size), slope in zip(inputs.values(), slopes, strict=True):
                if slope is not None:
                    bound += rounding(24 + 384) * (slope.abs() * size).sum().item()
            bound += rounding(m + 20) * pair_losses.abs().sum().item()
            losses.append(pair_losses.detach())
        metrics = trainer.train_step(0)
        everything = torch.cat(losses)
        report[name] = (metrics["loss"], everything.mean().item(), bound / everything.numel())
        trainer.close()
    torch.save(report, out_path)


def test_every_loss_type_through_the_real_step(tmp_path):
    out = tmp_path / "losses.pt"
    run_distributed(_loss_type_worker, 1, str(out))
    report = torch.load(out)
    assert set(report) == set(LOSS_CASES)
    values = []
    for name, (reported, expected, bound) in report.items():
        assert reported == pytest.approx(expected, abs=bound), name
        values.append(reported)
    # only the alias repeats: sigmoid is dpo
    assert len({round(v, 6) for v in values}) == len(values) - 1, "two loss types gave one loss"


# Every loss type, in three mixes (one run per mix and layout instead of one per loss type):
# each mix trains two steps on one process, on TP=2 and on PP=2, and must give the same
# losses and weights. Step 2 has a policy away from the reference, so no term is degenerate.
LAYOUT_MIXES = {
    "adaptive": {"loss_type": ["dpo", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard",
                               "aot", "apo_zero", "discopop", "sigmoid_norm", "simpo", "rdpo",
                               "cpo", "orpo", "sft"],
                 "rdpo_alpha": 0.01, "ld_alpha": 0.5},
    "smoothed": {"loss_type": ["exo_pair", "robust", "aot_unpaired", "sigmoid"],
                 "label_smoothing": 0.1, "adaptive": False},
    "plain": {"loss_type": ["apo_down", "sigmoid", "sft"], "adaptive": False,
              "use_weighting": True, "nll_reduction": "token"},
}


def _mix_worker(rank, world, overrides, out_path):
    results = {}
    for name, mix in LAYOUT_MIXES.items():
        loss = {f"loss.{k}": v for k, v in {"beta": 0.5, **mix}.items()}
        results[name] = run_steps(tiny_config({**loss, **overrides}), steps=2)
    if rank == 0:
        torch.save(results, out_path)


def test_every_loss_type_on_tp2_and_pp2_equals_one_process(tmp_path):
    runs = {}
    for layout, world, overrides in (("single", 1, {}),
                                     ("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
                                     ("pp2", 2, {"parallel.pipeline_model_parallel_size": 2})):
        out = tmp_path / f"{layout}.pt"
        run_distributed(_mix_worker, world, overrides, str(out), timeout=600)
        runs[layout] = torch.load(out, weights_only=False)
    for name, mix in LAYOUT_MIXES.items():
        history, params = runs["single"][name]
        assert history[1]["loss"] != pytest.approx(history[0]["loss"], rel=1e-3), name
        # float32 rounding's bounds (tests/support/tolerances.py) from the one-process run:
        # the sums, gradients and two SGD steps as for DPO; the mix's loss moves by its slope
        # with respect to the sums (loss_slope, term by term) times the largest sum's gap,
        # plus ||g|| times the weights' gap
        config = LossConfig(**{"beta": 0.5, **mix})
        gaps, weights = tiny_training_gaps(history, adaptive=config.adaptive)
        for step, bound in zip(history, gaps, strict=True):
            per_token = max(abs(step["logps_mean/chosen"]), abs(step["logps_mean/rejected"]))
            bound["loss"] = (loss_slope(config, per_token, loss=step["loss"])
                             * max(bound["logps/chosen"], bound["logps/rejected"])
                             + step["grad_norm"] * bound["weights"])
        for layout in ("tp2", "pp2"):
            got_history, got_params = runs[layout][name]
            for step in (0, 1):
                for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
                    assert got_history[step][key] == pytest.approx(
                        history[step][key], abs=gaps[step][key]), (name, layout, step, key)
            for pname, value in params.items():
                torch.testing.assert_close(got_params[pname], value, rtol=2 * U, atol=weights,
                                           msg=lambda m, n=f"{name} {layout} {pname}": f"{n}: {m}")
