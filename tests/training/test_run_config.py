"""The run config: shipped recipes, FP8 alignment, the held-out seed, the GPU benchmark shape."""

import pytest
import torch

from adadpo_megatron.training.layout import ParallelLayout
from tests.support.training import REPO

# Meta-Llama-3-8B-Instruct's and Meta-Llama-3-70B-Instruct's config.json (their published
# shapes), standing in for the recipes' model.hf directories, which this machine has not.
LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "num_key_value_heads": 8, "tie_word_embeddings": False,
          "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16"}
LLAMA3_70B = dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64)
# Llama-3.1-70B-Instruct's and Qwen3-30B-A3B's config.json (their published shapes)
LLAMA31_70B = dict(LLAMA3_70B, max_position_embeddings=131072, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})
LLAMA31_8B = dict(LLAMA31_70B, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32)
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
                 "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768,
                 "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                 "max_position_embeddings": 40960, "hidden_act": "silu",
                 "torch_dtype": "bfloat16", "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "attention_bias": False}
RECIPE_MODELS = {
    "llama3_8b_paper.yaml": dict(LLAMA3, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32),
    "llama3_70b_h100_fp8.yaml": LLAMA3_70B,
    "llama31_70b_lora_adadpo.yaml": LLAMA31_70B,
    "qwen3_30b_a3b_adadpo.yaml": QWEN3_30B_A3B,
    "llama31_8b_long_context_cp4.yaml": LLAMA31_8B,
}


def recipe_model_overrides(name, tmp_path):
    """model.hf=<a directory holding the recipe model's config.json>, for the recipes of
    published models."""
    import json

    if name not in RECIPE_MODELS:
        return []
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(RECIPE_MODELS[name]))
    return [f"model.hf={directory}"]


@pytest.mark.parametrize("name,world", [("tiny_cpu.yaml", 1), ("demo_sft.yaml", 2),
                                        ("demo_adadpo.yaml", 2), ("llama3_8b_paper.yaml", 8),
                                        ("llama3_70b_h100_fp8.yaml", 64),
                                        ("llama31_70b_lora_adadpo.yaml", 8),
                                        ("qwen3_30b_a3b_adadpo.yaml", 16),
                                        ("llama31_8b_long_context_cp4.yaml", 8)])
def test_shipped_recipes_are_consistent(name, world, tmp_path):
    """Every recipe parses and its layout fits the world it is written for (the Llama-3
    recipes' model.hf directories replaced by config.json files of the same shapes)."""

    from adadpo_megatron.training.run_config import load_run_config

    config = load_run_config(str(REPO / "configs" / name), recipe_model_overrides(name, tmp_path))
    dp = ParallelLayout.of(config, world).dp
    assert config.train.global_batch_size % (config.train.micro_batch_size * dp) == 0
    if name.startswith("llama3_70b"):
        assert (dp, config.parallel.virtual_pipeline_model_parallel_size) == (2, 5)
        with pytest.raises(ValueError, match="model.fp8='hybrid' needs a GPU"):
            config.check_machine(gpu=False)
    if name.startswith("llama31_70b_lora"):  # one node; the reference is the base itself
        assert (dp, config.reference.mode, config.model.lora.rank) == (1, "adapters_off", 16)
        assert config.model.rope_scaling and config.model.rope_scaling_factor == 8.0
    if name.startswith("llama31_8b_long_context"):  # one node: CP 4 x TP 2, packed
        p = config.parallel
        assert (dp, p.context_parallel_size, p.tensor_model_parallel_size) == (1, 4, 2)
        assert config.data.packing == "pack" and config.data.seq_length == 32768
        assert config.model.transformer["cp_comm_type"] == "p2p"
    if name.startswith("qwen3"):
        assert config.model.transformer["num_moe_experts"] == 128
        assert (dp, config.parallel.expert_model_parallel_size) == (16, 8)
        assert not config.model.moe_train_router


def test_fp8_needs_bf16_and_aligned_sequences(tmp_path):

    from adadpo_megatron.training.run_config import load_run_config

    path = str(REPO / "configs" / "llama3_70b_h100_fp8.yaml")
    model = recipe_model_overrides("llama3_70b_h100_fp8.yaml", tmp_path)
    with pytest.raises(ValueError, match="model.fp8='hybrid' needs train.dtype=bfloat16"):
        load_run_config(path, [*model, "train.dtype=float32"])
    with pytest.raises(ValueError, match=r"data.seq_length\(2050\) must be a multiple of 16"):
        load_run_config(path, [*model, "data.seq_length=2050"])
    with pytest.raises(ValueError, match=r"multiple of 32 for model.fp8_recipe='mxfp8'"):
        load_run_config(path, [*model, "data.seq_length=2064", "model.fp8_recipe=mxfp8"])


def test_eval_seed_fixes_the_held_out_pairs_across_training_seeds():
    """data.eval_seed decouples the held-out split from train.seed (the data order), so the
    seeds of a sweep, and a warm-up stage, hold out the same pairs."""

    from adadpo_megatron.data.micro_batches import split_held_out
    from adadpo_megatron.data.preference_data import load_preference_data
    from adadpo_megatron.data.tokenizers import ByteTokenizer
    from adadpo_megatron.training.run_config import load_run_config

    path = str(REPO / "configs" / "demo_adadpo.yaml")
    base = load_run_config(path, ["train.seed=1"])
    assert base.eval_seed == 1  # unset: the split follows train.seed, as before
    data, _ = load_preference_data(base.data_source(), ByteTokenizer(), base.data.settings(),
                                   cache=False)

    def held_out(*overrides):
        config = load_run_config(path, list(overrides))
        return split_held_out(data, config.data.eval_fraction, config.eval_seed)[1].example_ids

    fixed = [held_out(f"train.seed={seed}", "data.eval_seed=7") for seed in (1, 2)]
    assert fixed[0].tolist() == fixed[1].tolist()
    assert held_out("train.seed=1").tolist() != held_out("train.seed=2").tolist()
    with pytest.raises(ValueError, match="data.eval_seed=-1 must be an integer >= 0"):
        load_run_config(path, ["data.eval_seed=-1"])


def test_the_gpu_benchmark_shape_is_a_valid_one_gpu_run():
    """benchmarks/configs/gpu_step.yaml (bench_step's GPU shape) parses, fits one process and
    is refused on a CPU with the reason."""

    from adadpo_megatron.training.run_config import load_run_config

    path = REPO / "benchmarks" / "configs" / "gpu_step.yaml"
    config = load_run_config(str(path))
    assert ParallelLayout.of(config, 1).dp == 1
    assert config.model.transformer["num_layers"] == 2
    assert config.model.transformer["hidden_size"] == 4096
    config.check_machine(gpu=True)
    with pytest.raises(ValueError, match="train.dtype='bfloat16': CPU runs use float32"):
        config.check_machine(gpu=False)


@pytest.mark.parametrize("override,message", [
    ("optimizer.min_lr=abc", r"optimizer\.min_lr='abc' must be a number"),
    ("model.hidden_size=abc", r"model\.hidden_size='abc' must be an integer"),
    ("optimizer.adam_beta1=5", r"optimizer\.adam_beta1=5 is out of range; allowed: \[0\.0, 1\.0\)"),
    ("optimizer.clip_grad=.nan", r"optimizer\.clip_grad=nan must be a finite number"),
    ("optimizer.min_lr=1.0", r"optimizer\.min_lr=1\.0 is above optimizer\.lr"),
    ("model.num_layers=0", r"model\.num_layers=0 must be an integer >= 1"),
    ("train.distributed_timeout_minutes=0", r"train\.distributed_timeout_minutes=0 is out"),
    ("train.exit_after_minutes=-1", r"train\.exit_after_minutes=-1 is out of range"),
    ("train.resume_allow_changes=loss", r"train\.resume_allow_changes='loss' must be a list"),
])
def test_bad_model_and_optimizer_values_fail_when_the_config_is_read(override, message):
    """Issue 13: these failed after the model was built, or never."""
    from adadpo_megatron.training.run_config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"), [override])


@pytest.mark.parametrize("overrides,message", [
    (["data.max_tokens_per_micro_batch=0"],
     r"data\.max_tokens_per_micro_batch=0 must be an integer >= 1"),
    (["data.max_tokens_per_micro_batch=4096", "data.packing=longest"],
     r"data\.max_tokens_per_micro_batch=4096 sizes packed micro-batches; with "
     r"data\.packing='longest'"),
    (["data.max_tokens_per_micro_batch=255", "data.seq_length=128"],
     r"data\.max_tokens_per_micro_batch\(255\) is below 2 x data\.seq_length\(128\)"),
])
def test_bad_token_budgets_fail_when_the_config_is_read(overrides, message):
    from adadpo_megatron.training.run_config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides)


def test_token_budget_defaults_to_a_padded_micro_batch_and_sft_needs_one_side():
    from adadpo_megatron.training.run_config import load_run_config

    path = str(REPO / "configs" / "tiny_cpu.yaml")
    config = load_run_config(path, ["train.micro_batch_size=4", "data.seq_length=128"])
    assert config.micro_batch_tokens() == 2 * 4 * 128
    sft = load_run_config(path, ["train.stage=sft", "reference.mode=none", "data.seq_length=128",
                                 "data.max_tokens_per_micro_batch=128"])
    assert sft.micro_batch_tokens() == 128


def test_interleaved_pipelines_need_micro_batches_in_multiples_of_the_pipeline():
    """megatron-core's interleaved schedule refuses a micro-batch count that is not a multiple
    of PP (its microbatch_group_size_per_vp_stage defaults to PP); say so at load, naming the
    keys, rather than from inside the schedule."""
    from adadpo_megatron.training.run_config import load_run_config

    vpp = ["parallel.pipeline_model_parallel_size=2",
           "parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4"]
    path = str(REPO / "configs" / "tiny_cpu.yaml")
    padded = load_run_config(path, [*vpp, "data.packing=none", "train.global_batch_size=6",
                                    "train.micro_batch_size=2"])
    with pytest.raises(ValueError, match=r"= 3 micro-batches, not a multiple of parallel\."
                                         r"pipeline_model_parallel_size\(2\)"):
        ParallelLayout.of(padded, 2)
    # issue 23: 3 pairs on one data-parallel rank planned 2 micro-batches, and two long
    # pairs that fit no micro-batch together failed the step mid-run; now refused up front
    packed = load_run_config(path, [*vpp, "train.global_batch_size=3",
                                    "train.micro_batch_size=1"])
    with pytest.raises(ValueError, match=r"train.global_batch_size\(3\) is not divisible by "
                                         r"data-parallel size\(1\) \* parallel.pipeline_model_"
                                         r"parallel_size\(2\) = 2"):
        ParallelLayout.of(packed, 2)
    packed = load_run_config(path, [*vpp, "train.global_batch_size=4",
                                    "train.micro_batch_size=1"])
    assert ParallelLayout.of(packed, 2).dp == 1
    nine = load_run_config(path, [*vpp, "train.global_batch_size=9",
                                  "train.micro_batch_size=1"])
    with pytest.raises(ValueError, match=r"train.global_batch_size\(9\) is not divisible by "
                                         r"data-parallel size\(3\) \* parallel.pipeline_model_"
                                         r"parallel_size\(2\) = 6"):
        ParallelLayout.of(nine, 6)
    assert ParallelLayout.of(packed, 2).micro_batch_multiple == 2


@pytest.mark.parametrize("overrides,message", [
    (["model.lora.rank=0"], r"model\.lora\.rank=0 must be an integer >= 1"),
    (["model.lora.rank=4", "model.lora.alpha=0"], r"model\.lora\.alpha=0 is out of range"),
    (["model.lora.dropout=1.0"], r"model\.lora\.dropout=1\.0 is out of range"),
    (["model.lora.target_modules=[q_proj]"],
     r"model\.lora\.target_modules: 'q_proj' is not a linear layer LoRA adapts; choose from "
     r"linear_qkv, linear_proj, linear_fc1, linear_fc2"),
    (["model.lora.ranks=4"], r"unknown key model\.lora\.ranks"),
    (["model.lora=4"], r"model\.lora must be a mapping"),
    (["model.lora.rank=4", "model.load=null"], r"model\.lora trains adapters on a pretrained "
                                               r"base: set model\.hf or model\.load"),
    (["reference.mode=adapters_off", "model.load=null"],
     r"reference\.mode=adapters_off is the policy with its LoRA adapters switched off: it "
     r"needs model\.lora"),
    (["model.lora.rank=4", "reference.mode=adapters_off", "reference.load=ref"],
     r"reference\.mode=adapters_off uses the base .* reference\.load needs"),
    (["model.lora.rank=4", "model.num_moe_experts=4", "model.moe_ffn_hidden_size=32",
      "model.moe_router_topk=2"],
     r"model\.lora\.target_modules has linear_fc1, linear_fc2, which a mixture-of-experts "
     r"layer does not have"),
    # issue 23: the tiny preset's q/k/v linear is 128 x 64 (4 heads and 2 x 2 key/value heads
    # of 16, over hidden 64), its output linear 64 x 64
    (["model.lora.rank=65"], r"model\.lora\.rank=65 is larger than linear_qkv's smaller "
                             r"side \(128 x 64\)"),
    (["model.lora.rank=65", "model.lora.target_modules=[linear_fc1]"],
     r"model\.lora\.rank=65 is larger than linear_fc1's smaller side \(256 x 64\)"),
])
def test_bad_lora_settings_fail_when_the_config_is_read(overrides, message):
    from adadpo_megatron.training.run_config import load_run_config

    base = ["model.load=base_checkpoint"] if "model.load=null" not in overrides else []
    with pytest.raises(ValueError, match=message):
        load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"), base + overrides)


def test_reference_mode_defaults_to_adapters_off_with_lora():
    from adadpo_megatron.training.run_config import load_run_config

    tiny = str(REPO / "configs" / "tiny_cpu.yaml")  # which sets reference.mode: unset it
    lora = load_run_config(tiny, ["model.load=base", "model.lora.rank=4", "reference.mode=null"])
    assert lora.reference.mode == "adapters_off"
    assert load_run_config(tiny, ["reference.mode=null"]).reference.mode == "resident"


def test_num_epochs_or_max_steps_not_both():
    from tests.support.training import tiny_config

    with pytest.raises(ValueError, match=r"train.max_steps=3 and train.num_epochs=1 are both "
                                         "set; set one"):
        tiny_config({"train.max_steps": 3, "train.num_epochs": 1})
    with pytest.raises(ValueError, match="train.num_epochs"):
        tiny_config({"train.max_steps": None, "train.num_epochs": 0})
    assert tiny_config({"train.max_steps": None}).train.max_steps == 10  # neither: the default
    # exact, not float's: 1.1 x 800 / 8 is 110 steps (float arithmetic gives 111)
    assert tiny_config({"train.max_steps": None,
                        "train.num_epochs": 1.1}).train.steps_for_epochs(800) == 110


def test_an_evaluation_set_that_is_the_training_data_is_refused():
    from tests.support.training import DATA, tiny_config

    with pytest.raises(ValueError, match="is the training data itself"):
        tiny_config({"data.eval_path": str(DATA)})


def test_wandb_values_are_checked_by_type():
    from tests.support.training import tiny_config

    with pytest.raises(ValueError, match="train.wandb.tags='x' must be a list of strings"):
        tiny_config({"train.wandb": {"project": "p", "tags": "x"}})
    with pytest.raises(ValueError, match="train.wandb.name=3 must be a string"):
        tiny_config({"train.wandb": {"project": "p", "name": 3}})


def _epochs_worker(rank, world, out_path):
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import tiny_config

    # 1000 shipped pairs, 5 held out: 995 training pairs, 8 a step
    config = tiny_config({"train.max_steps": None, "train.num_epochs": 0.02,
                          "data.eval_fraction": 0.005})
    trainer = Trainer(config).setup()
    try:
        history = trainer.train()
        torch.save({"steps": [m["step"] for m in history],
                    "train_pairs": len(trainer.run.data.train_set),
                    "max_steps": config.train.max_steps}, out_path)
    finally:
        trainer.close()


@pytest.mark.slow
def test_num_epochs_trains_its_steps_over_the_pairs_kept(tmp_path, capfd):
    """train.num_epochs: ceil(epochs x training pairs / global batch) steps, the training
    pairs counted after the held-out split, and said at start."""
    import math

    from tests.support.distributed import run_distributed

    run_distributed(_epochs_worker, 1, str(tmp_path / "r.pt"))
    result = torch.load(tmp_path / "r.pt")
    assert result["train_pairs"] == 995
    steps = math.ceil(0.02 * 995 / 8)
    assert result["max_steps"] == steps == 3 and result["steps"] == list(range(steps))
    assert "train.num_epochs=0.02: 995 training pairs, 8 a step -> train.max_steps=3" in \
        capfd.readouterr().out


def test_cp_exchanges_transformer_engine_cannot_run_on_packed_batches_are_refused():
    """all_gather and a2a+p2p take THD (packed) batches from Transformer Engine 2.18 on (TE's
    own assertion before it: 'No support for cp_comm_type=all_gather and qkv_format=thd')."""
    from adadpo_megatron.training.run_config import check_cp_comm_type

    with pytest.raises(ValueError, match=r"model.cp_comm_type='all_gather' with "
                                         r"data.packing=pack \(THD\) needs Transformer Engine "
                                         r">= 2.18, and this one is 2.17.0"):
        check_cp_comm_type("all_gather", "pack", 2, "2.17.0")
    with pytest.raises(ValueError, match="a2a\\+p2p"):
        check_cp_comm_type("a2a+p2p", "pack", 4, "2.9.0+cu12")
    with pytest.raises(ValueError, match="model.cp_comm_type='ring' is not one of"):
        check_cp_comm_type("ring", "pack", 2, "2.18.0")
    for comm, packing, cp, version in (("all_gather", "pack", 2, "2.18.0.dev0"),
                                       ("all_gather", "longest", 2, "2.10"),
                                       ("p2p", "pack", 2, "1.13"), (None, "pack", 2, "2.0"),
                                       ("all_gather", "pack", 1, "2.0"),
                                       ("all_gather", "pack", 2, None)):
        check_cp_comm_type(comm, packing, cp, version)


def test_every_relative_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    """One rule for every path key (PATHS_RULE): a config in a sub-directory, its paths
    relative, read from the directory above; each resolves there, none beside the file."""
    from adadpo_megatron.training.run_config import PATH_KEYS, load_run_config
    from tests.mcore.test_hf_mapping import write_config

    for directory in (tmp_path / "hf", tmp_path / "configs" / "hf"):
        directory.mkdir(parents=True)
    write_config(tmp_path / "hf")
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    # the same names beside the config file, which the rule must not pick
    write_config(tmp_path / "configs" / "hf", hidden_size=128, intermediate_size=256)
    (tmp_path / "configs" / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "configs" / "run.yaml").write_text(
        "model: {hf: hf}\ndata: {path: pairs.jsonl, eval_path: held_out.jsonl}\n"
        "reference: {mode: precompute, load: ref, cache_path: ref.pt}\n"
        "train: {output_dir: out}\n")
    monkeypatch.chdir(tmp_path)
    config = load_run_config("configs/run.yaml")
    assert config.model.transformer["hidden_size"] == 64  # hf/config.json's, not configs/hf's
    assert config.data_source() == str(tmp_path / "pairs.jsonl")
    assert config.tokenizer_spec() == str(tmp_path / "hf")  # the model's own, as model.hf
    # model.load instead of model.hf: the one key the first config leaves unset
    loads = load_run_config("configs/run.yaml", ["model.hf=null", "model.load=ckpt",
                                                 "model.preset=tiny", "data.tokenizer=tok"])
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name) or getattr(getattr(loads, section), name)
        assert config.resolve(value) == tmp_path / value, key
