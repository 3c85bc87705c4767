"""Hugging Face Llama-family models in: model.hf and adadpo-import-hf, against transformers.

Oracle: transformers' own forward of the same tiny model (built here, weights scaled so that
the logits are far from uniform), on the same token ids, in float32. Sequences of ~200 tokens
make Llama 3.1's rope scaling matter (checked: without it the log-probs are off).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.hf_models import (
    ARCHITECTURES,
    SEQ,
    hf_config,
    hf_depth,
    make_hf_model,
    make_pairs,
    policy_token_logps,
    transformers_token_logps,
)
from tests.support.tolerances import U, dpo_training_gaps, logp_sum_gap, token_logp_gap
from tests.support.training import TINY

pytestmark = pytest.mark.slow

def _token_logps_worker(rank, world, tmp, name, data, out, oracle=None):
    import pathlib

    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    trainer = Trainer(hf_config(tmp, name, data)).setup()
    try:
        ours, batch = policy_token_logps(trainer)
    finally:
        trainer.close()
    theirs, logits = transformers_token_logps(tmp / (oracle or name), batch)
    mask = batch["labels"] != -100
    torch.save({"ours": ours[mask], "theirs": theirs[mask],
                "max_logit": logits[mask].abs().max().item()}, out)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    for name in ARCHITECTURES:
        make_hf_model(tmp / name, name)
    return tmp, make_pairs(tmp / "pairs.jsonl")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_imported_model_gives_transformers_log_probs(hf_models, name):
    tmp, data = hf_models
    out = tmp / f"{name}.pt"
    run_distributed(_token_logps_worker, 1, str(tmp), name, data, str(out))
    result = torch.load(out)
    assert result["ours"].numel() > 400
    # two float32 forward passes of one model (tolerances.token_logp_gap: ~2,400 roundings,
    # logits up to ~10): seen 2e-6 apart, bounded by ~1e-3; without rope scaling 1e-2 apart
    bound = token_logp_gap(result["max_logit"], hf_depth())
    torch.testing.assert_close(result["ours"], result["theirs"], rtol=0, atol=bound)
    assert result["theirs"].std() > 0.5, "the logits are far from uniform"


def test_without_rope_scaling_a_llama31_model_is_wrong(hf_models):
    """The check above can fail: the same 3.1 model read as plain Llama 3 differs."""
    tmp, data = hf_models
    plain = tmp / "llama31_unscaled"
    shutil.copytree(tmp / "llama31", plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (plain / "config.json").write_text(json.dumps(config))
    out = tmp / "unscaled.pt"
    # ours reads the copy without rope scaling; the oracle is the 3.1 model as it is
    run_distributed(_token_logps_worker, 1, str(tmp), "llama31_unscaled", data, str(out),
                    "llama31")
    result = torch.load(out)
    bound = token_logp_gap(result["max_logit"], hf_depth())  # the check's above
    assert (result["ours"] - result["theirs"]).abs().max() > bound


def _layout_worker(rank, world, tmp, name, data, overrides, out):
    import pathlib

    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    config = hf_config(tmp, name, data, **{"data.eval_fraction": 0.5,
                                           "train.output_dir": str(tmp / f"run_{world}_{name}"),
                                           **overrides})
    trainer = Trainer(config).setup()
    try:
        metrics = trainer.evaluate()
    finally:
        trainer.close()
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, metrics)
    if rank == 0:
        torch.save(max(everyone, key=len), out)


@pytest.mark.parametrize("layout", [{"parallel.tensor_model_parallel_size": 2},
                                    {"parallel.pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_import_on_two_ranks_equals_one(hf_models, tmp_path, layout):
    tmp, data = hf_models
    results = []
    for world, overrides in ((1, {}), (2, layout)):
        out = tmp_path / f"{world}.pt"
        run_distributed(_layout_worker, world, str(tmp), "llama32_tied", data, overrides,
                        str(out))
        results.append(torch.load(out))
    one, two = results
    for key in ("eval/logps/chosen", "eval/logps/rejected"):
        # means of sums of <= SEQ token log-probs (tolerances.logp_sum_gap)
        assert two[key] == pytest.approx(one[key], abs=logp_sum_gap(one[key], SEQ, hf_depth())), key
    # the resident reference is the policy's own computation: z = 0, ln 2 up to float32's
    assert one["eval/loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def _import_command_worker(rank, world, tmp, name, data, out):
    import pathlib

    from adadpo_megatron.training.huggingface.hf_import import import_checkpoint
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import gather_full_parameters

    tmp = pathlib.Path(tmp)
    import_checkpoint(tmp / name, tmp / "imported", pp=world)
    from adadpo_megatron.mcore.hf_mapping import read_architecture

    architecture = {k: v for k, v in read_architecture(tmp / name).model_section().items()}
    results = {}
    for key, model in (("hf", None), ("load", {**architecture, "vocab_size": 384,
                                               "load": str(tmp / "imported")})):
        config = hf_config(tmp, name, data, model=model,
                           **{"train.output_dir": str(tmp / f"run_{key}")})
        trainer = Trainer(config).setup()
        try:
            results[key] = gather_full_parameters(trainer)
        finally:
            trainer.close()
    if rank == 0:
        torch.save(results, out)


def test_import_command_writes_what_model_hf_loads(hf_models, tmp_path):
    """adadpo-import-hf on 2 pipeline ranks, loaded with model.load on 1, equals model.hf."""
    tmp, data = hf_models
    out = tmp_path / "imported.pt"
    run_distributed(_import_command_worker, 2, str(tmp), "qwen2", data, str(out))
    results = torch.load(out)
    assert results["hf"].keys() == results["load"].keys()
    for name, value in results["hf"].items():
        assert torch.equal(results["load"][name], value), name
    assert (tmp / "run_hf" / "hf_import" / "hf_source.json").is_file()


def _import_export_worker(rank, world, tmp, name, layout, out_dir):
    import pathlib

    from adadpo_megatron.training.huggingface.hf_export import export_checkpoint
    from adadpo_megatron.training.huggingface.hf_import import import_checkpoint

    tmp = pathlib.Path(tmp)
    imported = tmp / f"imported_{layout}"
    import_checkpoint(tmp / name, imported, tp=2 if layout == "tp2" else 1)
    if rank == 0:  # export is one process, whatever layout wrote the checkpoint
        export_checkpoint(imported, out_dir, shard_bytes=40_000)


def _safetensors(directory):
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "qwen3_moe"])
def test_import_then_export_gives_back_the_tensors_bit_for_bit(hf_models, tmp_path, name):
    """On one process, TP=2 and PP=2; the export is sharded with an index."""
    tmp, _ = hf_models
    original = _safetensors(tmp / name)
    for layout, world in (("single", 1), ("tp2", 2), ("pp2", 2)):
        out = tmp_path / layout
        run_distributed(_import_export_worker, world, str(tmp), name, layout, str(out))
        exported = _safetensors(out)
        assert exported.keys() == original.keys(), layout
        for key, value in original.items():
            assert torch.equal(exported[key], value), (layout, key)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)
        assert json.loads((out / "config.json").read_text())["model_type"] == name


def _train_and_export_worker(rank, world, tmp, name, data, out_dir, result_path):
    import pathlib

    from adadpo_megatron.training.huggingface.hf_export import export_checkpoint
    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    config = hf_config(tmp, name, data, **{"train.output_dir": str(tmp / "trained"),
                                           "train.max_steps": 2, "optimizer.lr": 0.5})
    trainer = Trainer(config).setup()
    try:
        trainer.train()  # saves the final checkpoint
        ours, batch = policy_token_logps(trainer)
    finally:
        trainer.close()
    export_checkpoint(tmp / "trained", out_dir)  # the run directory: its latest checkpoint
    torch.save({"ours": ours, "batch": batch}, result_path)


def test_a_trained_policy_exports_to_transformers(hf_models, tmp_path):
    """Train from model.hf, export the run, load it with transformers: the trained policy's
    log-probs, and the source's config (rope scaling, tied embeddings) carried over."""
    tmp, data = hf_models
    out, result = tmp_path / "exported", tmp_path / "trained.pt"
    run_distributed(_train_and_export_worker, 1, str(tmp), "llama32_tied", data, str(out),
                    str(result))
    trained = torch.load(result, weights_only=False)
    batch = trained["batch"]
    theirs, logits = transformers_token_logps(out, batch)
    mask = batch["labels"] != -100
    # two float32 forward passes of the same weights (tolerances.token_logp_gap)
    bound = token_logp_gap(logits[mask].abs().max().item(), hf_depth())
    torch.testing.assert_close(trained["ours"][mask], theirs[mask], rtol=0, atol=bound)
    _, before = transformers_token_logps(tmp / "llama32_tied", batch)
    assert not torch.allclose(before, logits, atol=1e-3), "the export holds the trained weights"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rope_parameters"]["factor"] == 32.0


def test_the_readme_three_commands_on_a_tiny_llama(hf_models, tmp_path):
    """python -m adadpo_megatron with model.hf, then adadpo-export-hf, then transformers."""
    import os
    import subprocess
    import sys

    import yaml
    from transformers import AutoModelForCausalLM

    from tests.support.training import free_port

    tmp, data = hf_models
    config = copy.deepcopy(TINY)
    config["model"] = {"hf": str(tmp / "llama31")}
    # data.tokenizer unset: model.hf's own tokenizer, which the export carries over
    config["data"] = {"path": data, "seq_length": SEQ, "max_prompt_length": 128}
    config["train"].update(max_steps=2, output_dir=str(tmp_path / "run"), progress=False,
                           tensorboard=False)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for command in ([sys.executable, "-m", "adadpo_megatron", "--config", str(config_path)],
                    [sys.executable, "-m", "adadpo_megatron", "export-hf",
                     str(tmp_path / "run"), str(tmp_path / "exported")]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(tmp / "llama31", dtype=torch.float32)
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moved = (exported(tokens).logits - source(tokens).logits).abs().max()
    assert moved > 1e-3, "two AdaDPO steps changed the exported weights"
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.eos_token_id == 301 and len(tokenizer) == 302
    assert GenerationConfig.from_pretrained(tmp_path / "exported") is not None
    assert (tmp_path / "run" / "hf_import" / "hf_source.json").is_file()


def _router_worker(rank, world, tmp, data, train_router, out):
    import pathlib

    from adadpo_megatron.training.trainer import Trainer

    tmp = pathlib.Path(tmp)
    config = hf_config(tmp, "qwen3_moe", data, **{
        "model.moe_train_router": train_router, "optimizer.lr": 0.5,
        "train.output_dir": str(tmp / f"run_router_{train_router}")})
    trainer = Trainer(config).setup()
    try:
        def weights():
            return {name: param.detach().clone()
                    for name, param in trainer.model[0].module.named_parameters()
                    if ".mlp." in name}

        before = weights()
        trainer.train_step(0)
        trainer.train_step(1)  # two updates: a frozen router stays put across steps
        after = weights()
    finally:
        trainer.close()
    torch.save({name: not torch.equal(before[name], after[name]) for name in before}, out)


@pytest.mark.parametrize("train_router", [False, True], ids=["frozen", "trained"])
def test_the_router_is_frozen_unless_asked(hf_models, tmp_path, train_router):
    """Preference training keeps the pretrained routing by default (model.moe_train_router)."""
    tmp, data = hf_models
    out = tmp_path / "moved.pt"
    run_distributed(_router_worker, 1, str(tmp), data, train_router, str(out))
    moved = torch.load(out)
    routers = [name for name in moved if ".mlp.router." in name]
    experts = [name for name in moved if ".mlp.experts." in name]
    assert routers and experts
    assert all(moved[name] for name in experts), "the experts train"
    assert all(moved[name] == train_router for name in routers), moved


def _expert_parallel_worker(rank, world, tmp, data, overrides, out):
    import pathlib

    from tests.support.training import run_steps

    tmp = pathlib.Path(tmp)
    config = hf_config(tmp, "qwen3_moe", data, **{
        "optimizer.lr": 0.5, "train.global_batch_size": 4, "train.micro_batch_size": 1,
        "train.output_dir": str(tmp / f"run_ep_{world}_{len(overrides)}"), **overrides})
    history, params = run_steps(config, steps=2)
    if rank == 0:
        torch.save((history, params), out)


@pytest.mark.parametrize("layout", [{"parallel.expert_model_parallel_size": 2},
                                    {"parallel.expert_model_parallel_size": 2,
                                     "data.packing": "pack"}],
                         ids=["ep2_dp2", "ep2_dp2_packed"])
def test_expert_parallel_training_equals_one_process(hf_models, tmp_path, layout):
    """Two experts on each of two ranks (megatron-core's all-to-all dispatcher over gloo)
    train as the four on one process: losses, gradient norms and every weight, experts
    gathered by their global index."""
    tmp, data = hf_models
    results = []
    for world, overrides in ((1, {}), (2, layout)):
        out = tmp_path / f"{world}.pt"
        run_distributed(_expert_parallel_worker, world, str(tmp), data, overrides, str(out))
        results.append(torch.load(out, weights_only=False))
    (one, one_params), (two, two_params) = results
    # How far float32 rounding lets the two runs drift (tests/support/tolerances.py), from
    # what the one-process run measured: each sum of ~100 token log-probs (~620 nats) may be
    # off by 7 sqrt(n) U of its size, n = 256 tokens + 2,500 roundings of each token's
    # forward pass; the gradient alike over the batch's 2,048 positions and both passes;
    # step 0's clipped gradient moves the next weights by lr * clip_grad times its relative
    # gap, which moves step 1's loss by ||g|| times that, and its gradient and sums by
    # Gauss-Newton estimates of the curvature. (Seen: 3e-6 on step 1's loss, bounded by 0.04;
    # 6e-7 on a weight, bounded by 1e-3.)
    gaps, weights = dpo_training_gaps(one, beta=0.5, depth=hf_depth(), seq=SEQ,
                                      batch_tokens=4 * 2 * SEQ, lr=0.5, clip_grad=1.0)
    for got, want, bound in zip(two, one, gaps, strict=True):
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert got[key] == pytest.approx(want[key], abs=bound[key]), key
    assert one[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert two_params.keys() == one_params.keys()
    assert any(".local_experts.3." in name for name in two_params)
    for name, value in one_params.items():
        # rtol: each weight's own update rounds, at most U |w| a step
        torch.testing.assert_close(two_params[name], value, rtol=2 * U, atol=weights,
                                   msg=lambda m, n=name: f"{n}: {m}")
