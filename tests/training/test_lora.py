"""LoRA preference training (model.lora) on a tiny Hugging Face Llama, end to end.

Oracles: full-model DPO's first step (with B = 0 the adapted model is the base, so the loss
is the base's and the gradient of B is scale * G A^T, G the full model's weight gradient);
the single-process run for TP2 / PP2 and for resuming on another layout; the resident frozen
copy of the base for reference.mode adapters_off; transformers (merged export) and peft (the
PEFT directory) for the exports.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.hf_models import (
    SEQ,
    hf_config,
    hf_depth,
    make_hf_model,
    make_pairs,
    policy_token_logps,
    transformers_token_logps,
)
from tests.support.tolerances import (
    U,
    dpo_loss_gap,
    dpo_training_gaps,
    gap,
    gradient_gap,
    logp_sum_gap,
    token_logp_gap,
)
from tests.support.training import gather_full_parameters

pytestmark = pytest.mark.slow

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["linear_qkv", "linear_proj", "linear_fc1",
                                                     "linear_fc2"]}
SCALE = LORA["alpha"] / LORA["rank"]
TARGETS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
           "mlp.linear_fc2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    make_hf_model(tmp / "llama3", "llama3")
    return tmp, make_pairs(tmp / "pairs.jsonl")


def _gaps(history, layers=2, **overrides):
    """tests/support/tolerances.py's bounds for two layouts of a 2-step LoRA run on the tiny
    Llama: sums of <= SEQ token log-probs, 8 pairs a step, SGD lr 0.5 clipped to 1."""
    return dpo_training_gaps(history, beta=0.5, depth=hf_depth(layers), seq=SEQ,
                             batch_tokens=2 * 8 * SEQ, lr=0.5, clip_grad=1.0, **overrides)


def _config(tmp, data, run, model=None, **overrides):
    """The LoRA run on the tiny Llama (``model``: another model section than model.hf)."""
    settings = {"model.lora": LORA, "reference.mode": "adapters_off",
                "train.output_dir": str(tmp / run), **overrides}
    if settings["model.lora"] is None:
        del settings["model.lora"]
    return hf_config(tmp, "llama3", data, model=model, **settings)


def _steps_worker(rank, world, tmp, data, run, overrides, steps, out):
    """Trains ``steps`` steps; saves (metrics, full parameters before and after) on rank 0."""
    from adadpo_megatron.training.precompute import precompute_reference
    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    config = _config(tmp, data, run, **overrides)
    if config.reference.mode == "precompute":
        precompute_reference(config)
    trainer = Trainer(config).setup()
    try:
        before = gather_full_parameters(trainer)
        history = [trainer.train_step(step) for step in range(steps)]
        after = gather_full_parameters(trainer)
    finally:
        trainer.close()
    _save_on_rank_0(rank, world, history, out, before=before, after=after)


def _save_on_rank_0(rank, world, history, out, **parameters):
    """The metrics (complete on the last pipeline stage) and ``parameters``, on rank 0."""
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, history)
    if rank == 0:
        complete = max(everyone, key=lambda h: len(h[0]) if h else 0)
        torch.save({"history": complete, **parameters}, out)


def _run(world, tmp, data, run, overrides, steps, out):
    run_distributed(_steps_worker, world, str(tmp), data, run, overrides, steps, str(out))
    return torch.load(out, weights_only=False)


def test_a_zero_b_starts_as_the_base_and_steps_as_full_dpo_projected(llama, tmp_path):
    """Step 0: loss ln 2 and equal to full-model DPO's; after one SGD step (no clipping) A is
    unchanged and B = -lr * scale * G A^T = scale * (W1 - W0) A^T, W1 - W0 being full DPO's
    own step; the base weights do not move."""
    tmp, data = llama
    sgd = {"optimizer.clip_grad": 0.0, "optimizer.lr": 0.5}
    lora = _run(1, tmp, data, "zero_b", sgd, 1, tmp_path / "lora.pt")
    full = _run(1, tmp, data, "full", {**sgd, "model.lora": None, "reference.mode": "resident"},
                1, tmp_path / "full.pt")
    # B = 0: the adapted model computes the base's values exactly (it adds B A x = 0), and
    # adapters_off's reference is the same computation: ln 2 up to float32's, and equal
    assert lora["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert lora["history"][0]["loss"] == pytest.approx(full["history"][0]["loss"], abs=1e-7)
    # Float32 rounding's bound on B - scale (W1 - W0) A^T (tests/support/tolerances.py):
    # B's gradient and full DPO's are two computations of one gradient, whose difference
    # (gradient_gap, unclipped: times lr) moves entry (i, j) by at most its norm times A's
    # row j's; W1 - W0 carries W1's rounding, U |W1| an entry, through the product with A^T;
    # and that product rounds (K terms)
    moved = 0.5 * gradient_gap(full["history"][0]["grad_norm"], 2 * 8 * SEQ, hf_depth())
    layers = 2
    for layer in range(layers):
        for target in TARGETS:
            prefix = f"decoder.layers.{layer}.{target}"
            a0 = lora["before"][f"{prefix}_lora.lora_a"]
            assert torch.equal(lora["before"][f"{prefix}_lora.lora_b"],
                               torch.zeros_like(lora["before"][f"{prefix}_lora.lora_b"]))
            assert torch.equal(lora["after"][f"{prefix}_lora.lora_a"], a0), prefix
            step = full["after"][f"{prefix}.weight"] - full["before"][f"{prefix}.weight"]
            expected = SCALE * step @ a0.T
            assert expected.abs().max() > 1e-4, "the step moves B"
            bound = SCALE * (U * full["after"][f"{prefix}.weight"].abs() @ a0.abs().T
                             + moved * a0.norm(dim=1))
            bound += gap(a0.shape[1], SCALE * (step.abs() @ a0.abs().T).max().item())
            difference = (lora["after"][f"{prefix}_lora.lora_b"] - expected).abs()
            assert (difference <= bound).all(), (prefix, (difference / bound).max())
    for name, value in lora["before"].items():
        if "_lora." not in name:
            assert torch.equal(lora["after"][name], value), f"the base moved: {name}"


@pytest.fixture(scope="module")
def one_process(llama, tmp_path_factory):
    tmp, data = llama
    return _run(1, tmp, data, "single", {}, 2, tmp_path_factory.mktemp("one") / "r.pt")


@pytest.mark.parametrize("layout", [{"parallel.tensor_model_parallel_size": 2},
                                    {"parallel.pipeline_model_parallel_size": 2},
                                    {"parallel.context_parallel_size": 2}],
                         ids=["tp2", "pp2", "cp2"])
def test_two_ranks_equal_one(llama, one_process, tmp_path, layout):
    tmp, data = llama
    two = _run(2, tmp, data, f"two_{len(layout)}_{list(layout)[0]}", layout, 2,
               tmp_path / "r.pt")
    gaps, weights = _gaps(one_process["history"])
    for got, want, bound in zip(two["history"], one_process["history"], gaps, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert got[key] == pytest.approx(want[key], abs=bound[key]), key
    assert two["after"].keys() == one_process["after"].keys()
    for name, value in one_process["after"].items():
        torch.testing.assert_close(two["after"][name], value, rtol=2 * U, atol=weights,
                                   msg=name)


def test_interleaved_pipeline_equals_one_process(llama, tmp_path):
    """PP 2 x VPP 2 (a 4-layer model: one layer a virtual stage) against one process."""
    tmp, data = llama
    make_hf_model(tmp / "llama3_4", "llama3", layers=4)
    runs = {}
    for world, layout in ((1, {}), (2, {"parallel.pipeline_model_parallel_size": 2,
                                        "parallel.virtual_pipeline_model_parallel_size": 2})):
        runs[world] = _run(world, tmp, data, f"vpp_{world}",
                           {"model.hf": str(tmp / "llama3_4"), **layout}, 2,
                           tmp_path / f"{world}.pt")
    gaps, weights = _gaps(runs[1]["history"], layers=4)
    for got, want, bound in zip(runs[2]["history"], runs[1]["history"], gaps, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert got[key] == pytest.approx(want[key], abs=bound[key]), key
    assert any(".3.self_attention.linear_qkv_lora." in name for name in runs[1]["after"])
    for name, value in runs[1]["after"].items():
        torch.testing.assert_close(runs[2]["after"][name], value, rtol=2 * U, atol=weights,
                                   msg=name)


@pytest.mark.parametrize("mode", ["resident", "precompute"])
def test_adapters_off_equals_a_frozen_copy_of_the_base(llama, one_process, tmp_path, mode):
    """reference.mode adapters_off (one_process) against a resident frozen copy of the base
    and against log-probs precomputed from it: the same metrics and weights, two steps."""
    tmp, data = llama
    overrides = {"reference.mode": mode}
    if mode == "precompute":
        overrides["reference.cache_path"] = str(tmp_path / "reference.pt")
    other = _run(1, tmp, data, f"ref_{mode}", overrides, 2, tmp_path / "r.pt")
    # the policy's computation is the same; the reference's sums come from another model
    # object or a cache of padded rows, so they may round apart: step 0's z by beta (C + 1)
    # times a sum's gap, the loss from ln 2 by half that, later steps as two layouts'
    gaps, weights = _gaps(one_process["history"])
    first = one_process["history"][0]
    sums = {side: logp_sum_gap(first[f"logps/{side}"], SEQ, hf_depth())
            for side in ("chosen", "rejected")}
    gaps[0]["loss"] = dpo_loss_gap(0.5, sums["chosen"], sums["rejected"], reference=False,
                                   clip=2.0, loss=math.log(2.0), log_ratio=0.0)
    for got, want, bound in zip(other["history"], one_process["history"], gaps, strict=True):
        for key, value in want.items():
            if key.startswith(("loss", "rewards", "logps", "grad_norm")):
                # rewards/accuracies, a fraction of pairs: equal unless a margin rounds across 0
                assert got[key] == pytest.approx(value, abs=bound.get(key, 0.0)), key
    for name, value in one_process["after"].items():
        torch.testing.assert_close(other["after"][name], value, rtol=2 * U, atol=weights,
                                   msg=name)


def _train_export_worker(rank, world, tmp, data, layout, base, out_dir, peft_dir, result_path):
    from adadpo_megatron.mcore.hf_mapping import read_architecture
    from adadpo_megatron.training.huggingface.hf_export import export_checkpoint
    from adadpo_megatron.training.huggingface.hf_import import import_checkpoint
    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    run = tmp / f"trained_{world}_{base}"
    settings = {"train.max_steps": 2, **layout}
    if base == "load":  # the base an adadpo-import-hf checkpoint (model.load), not model.hf
        import_checkpoint(tmp / "llama3", tmp / "imported_llama3")
        settings["model"] = {**read_architecture(tmp / "llama3").model_section(),
                             "vocab_size": 384, "load": str(tmp / "imported_llama3")}
    config = _config(tmp, data, run.name, **settings)
    trainer = Trainer(config).setup()
    try:
        trainer.train()  # saves the final checkpoint
        ours, batch = policy_token_logps(trainer)  # the oracle of both exports
    finally:
        trainer.close()
    if rank == 0:  # export is one process, whatever layout wrote the checkpoint
        export_checkpoint(run, out_dir)
        export_checkpoint(run, peft_dir, peft=True)
        torch.save({"ours": ours, "batch": batch}, result_path)


def _peft_token_logps(base, adapter, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.float()
    labels = batch["labels"].clamp(min=0)[..., None]
    return torch.log_softmax(logits, -1).gather(-1, labels).squeeze(-1)


@pytest.mark.parametrize("world,layout,base", [
    (1, {}, "hf"), (2, {"parallel.tensor_model_parallel_size": 2}, "hf"), (1, {}, "load")],
    ids=["single", "tp2", "single_model_load"])
def test_a_lora_run_exports_merged_and_as_a_peft_adapter(llama, tmp_path, world, layout, base):
    """The merged export in transformers and the PEFT directory on the base in peft give the
    trained policy's log-probs, whether the base was model.hf (merged into its safetensors)
    or model.load (merged into its torch_dist checkpoint); the checkpoints hold the adapters
    only."""
    pytest.importorskip("peft")
    tmp, data = llama
    merged, adapter, result = tmp_path / "merged", tmp_path / "peft", tmp_path / "r.pt"
    run_distributed(_train_export_worker, world, str(tmp), data, layout, base, str(merged),
                    str(adapter), str(result))
    trained = torch.load(result, weights_only=False)
    batch = trained["batch"]
    mask = batch["labels"] != -100
    theirs, logits = transformers_token_logps(merged, batch)
    # float32 forward passes of the same weights (tolerances.token_logp_gap)
    bound = token_logp_gap(logits[mask].abs().max().item(), hf_depth())
    torch.testing.assert_close(trained["ours"][mask], theirs[mask], rtol=0, atol=bound)
    _, base_logits = transformers_token_logps(tmp / "llama3", batch)
    assert (base_logits - logits).abs().max() > 1e-3, "the adapters changed the model"
    with_peft = _peft_token_logps(tmp / "llama3", adapter, batch)
    torch.testing.assert_close(trained["ours"][mask], with_peft[mask], rtol=0, atol=bound)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == LORA["rank"] and config["lora_alpha"] == LORA["alpha"]
    from adadpo_megatron.data.tokenizers import TOKENIZER_FILES

    tokenizer = {name for name in TOKENIZER_FILES if (tmp / "llama3" / name).is_file()}
    assert tokenizer and all((adapter / name).is_file() for name in tokenizer), tokenizer
    from adadpo_megatron.training.huggingface.dcp_reader import tensor_metadata

    saved = tensor_metadata(tmp / f"trained_{world}_{base}" / "checkpoints" / "step_0000002")
    assert saved and all("_lora." in key for key in saved), sorted(saved)


def _resume_worker(rank, world, tmp, data, run, overrides, steps, resume, out):
    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    extra = {"train.resume": resume} if resume else {}
    config = _config(tmp, data, run, **{**MOMENTUM, "train.max_steps": steps, **overrides,
                                        **extra})
    trainer = Trainer(config).setup()
    try:
        history = trainer.train()
        after = gather_full_parameters(trainer)
    finally:
        trainer.close()
    _save_on_rank_0(rank, world, history, out, after=after)


# momentum: optimizer state that the checkpoint must carry. (Not Adam: its first update of A,
# lr * g / (|g| + eps), flips sign on float noise where g ~ 0, and TP2's float noise is not
# one process's.)
MOMENTUM = {"optimizer.sgd_momentum": 0.9}


def test_a_lora_checkpoint_resumes_exactly_on_another_layout(llama, tmp_path):
    """SGD with momentum, 1 step at TP2 (saved: adapters and their momentum only), then 1
    step on one process from that checkpoint, equals 2 steps on one process."""
    tmp, data = llama
    results = {}
    for name, world, overrides, steps, resume in (
            ("straight", 1, {}, 2, None),
            ("first", 2, {"parallel.tensor_model_parallel_size": 2}, 1, None),
            ("resumed", 1, {}, 2, str(tmp / "resume_first" / "checkpoints" / "step_0000001"))):
        out = tmp_path / f"{name}.pt"
        run_distributed(_resume_worker, world, str(tmp), data, f"resume_{name}", overrides,
                        steps, resume, str(out))
        results[name] = torch.load(out, weights_only=False)
    straight, resumed = results["straight"], results["resumed"]
    assert [m["step"] for m in resumed["history"]] == [1]
    # step 0 on TP2 against one process, then one more step: two layouts' bounds
    gaps, weights = _gaps(straight["history"], momentum=0.9)
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert resumed["history"][0][key] == pytest.approx(straight["history"][1][key],
                                                          abs=gaps[1][key]), key
    for name, value in straight["after"].items():
        torch.testing.assert_close(resumed["after"][name], value, rtol=2 * U, atol=weights,
                                   msg=name)
