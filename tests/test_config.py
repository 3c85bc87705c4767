"""LossConfig validation: every bad value names the key, the value and the allowed range."""

import math

import pytest

from adadpo_megatron.config import LossConfig


def test_defaults_follow_the_paper():
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.adaptive, cfg.clip, cfg.gradient_ratio) == ("dpo", True, 2.0, 1.0)
    assert (cfg.coefficient_reduction, cfg.coefficient_space) == ("mean", "policy")
    assert cfg.effective_nll_weight == 0.0
    assert LossConfig(loss_type="cpo").effective_nll_weight == 1.0
    assert LossConfig(loss_type="orpo").effective_nll_weight == 1.0
    assert LossConfig(loss_type="orpo", nll_weight=0.25).effective_nll_weight == 0.25
    assert LossConfig(clip=math.inf).clip == math.inf


@pytest.mark.parametrize("field,value,message", [
    ("loss_type", "kto", r"loss\.loss_type='kto' is not allowed; choose one of 'dpo'"),
    ("beta", 0.0, r"loss\.beta=0\.0 is out of range; allowed: \(0\.0, inf\]"),
    ("beta", -1, r"loss\.beta=-1 is out of range"),
    ("beta", math.nan, r"loss\.beta=nan must be a finite number"),
    ("beta", "0.1", r"loss\.beta='0\.1' must be a number"),
    ("beta", True, r"loss\.beta=True must be a number"),
    ("clip", 0, r"loss\.clip=0 is out of range; allowed: \(0\.0, inf\]"),
    ("adaptive", "yes", r"loss\.adaptive='yes' must be true or false"),
    ("coefficient_space", "log", r"loss\.coefficient_space='log' is not allowed"),
    ("coefficient_reduction", "max", r"loss\.coefficient_reduction='max' is not allowed"),
    ("gradient_ratio", 0.0, r"loss\.gradient_ratio=0\.0 is out of range"),
    ("gradient_ratio", math.inf, r"loss\.gradient_ratio=inf must be a finite number"),
    ("label_smoothing", 0.5,
     r"loss\.label_smoothing=0\.5 is out of range; allowed: \[0\.0, 0\.5\)"),
    ("simpo_gamma", math.inf, r"loss\.simpo_gamma=inf must be a finite number"),
    ("rdpo_alpha", -0.1, r"loss\.rdpo_alpha=-0\.1 is out of range"),
    ("nll_weight", -1.0, r"loss\.nll_weight=-1\.0 is out of range"),
    ("orpo_lambda", -1.0, r"loss\.orpo_lambda=-1\.0 is out of range"),
])
def test_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**{field: value})


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "ipo", "label_smoothing": 0.1}, r"label_smoothing=0\.1 applies only to"),
    ({"loss_type": "simpo", "coefficient_space": "ratio"}, r"'simpo' is reference-free"),
    ({"loss_type": "orpo", "coefficient_reduction": "sum"}, r"not defined for loss_type='orpo'"),
])
def test_invalid_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_shipped_loss_presets_load():
    import pathlib

    import yaml

    from adadpo_megatron.config import from_mapping

    presets = sorted((pathlib.Path(__file__).parents[1] / "configs" / "loss").glob("*.yaml"))
    assert presets, "configs/loss/*.yaml missing"
    for path in presets:
        cfg = from_mapping(LossConfig, yaml.safe_load(path.read_text()), "loss")
        assert isinstance(cfg, LossConfig), path


def test_unknown_key_is_named():
    from adadpo_megatron.config import from_mapping

    with pytest.raises(ValueError, match=r"unknown key loss\.betta; known keys of loss: "
                                         r"adaptive, beta"):
        from_mapping(LossConfig, {"betta": 0.1}, "loss")


@pytest.mark.parametrize("name,world", [("tiny_cpu.yaml", 1), ("demo_sft.yaml", 2),
                                        ("demo_adadpo.yaml", 2), ("llama3_8b_paper.yaml", 8),
                                        ("llama3_70b_h100_fp8.yaml", 64)])
def test_shipped_recipes_are_consistent(name, world):
    """Every recipe parses and its layout fits the world it is written for."""
    import pathlib

    from adadpo_megatron.run_config import load_run_config

    config = load_run_config(str(pathlib.Path(__file__).parents[1] / "configs" / name))
    dp = config.check_layout(world)
    assert config.train.global_batch_size % (config.train.micro_batch_size * dp) == 0
    if name.startswith("llama3_70b"):
        assert (dp, config.parallel.virtual_pipeline_model_parallel_size) == (2, 5)
        with pytest.raises(ValueError, match="model.fp8='hybrid' needs a GPU"):
            config.check_machine(gpu=False)


def test_fp8_needs_bf16_and_aligned_sequences():
    import pathlib

    from adadpo_megatron.run_config import load_run_config

    path = str(pathlib.Path(__file__).parents[1] / "configs" / "llama3_70b_h100_fp8.yaml")
    with pytest.raises(ValueError, match="model.fp8='hybrid' needs train.dtype=bfloat16"):
        load_run_config(path, ["train.dtype=float32"])
    with pytest.raises(ValueError, match=r"data.seq_length\(2050\) must be a multiple of 16"):
        load_run_config(path, ["data.seq_length=2050"])
    with pytest.raises(ValueError, match=r"multiple of 32 for model.fp8_recipe='mxfp8'"):
        load_run_config(path, ["data.seq_length=2064", "model.fp8_recipe=mxfp8"])


def test_eval_seed_fixes_the_held_out_pairs_across_training_seeds():
    """data.eval_seed decouples the held-out split from train.seed (the data order), so the
    seeds of a sweep, and a warm-up stage, hold out the same pairs."""
    import pathlib

    from adadpo_megatron.data import split_held_out
    from adadpo_megatron.dataset import load_preference_data
    from adadpo_megatron.run_config import load_run_config
    from adadpo_megatron.tokenizer import ByteTokenizer

    path = str(pathlib.Path(__file__).parents[1] / "configs" / "demo_adadpo.yaml")
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
    import pathlib

    from adadpo_megatron.run_config import load_run_config

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "configs" / "gpu_step.yaml"
    config = load_run_config(str(path))
    assert config.check_layout(1) == 1
    assert config.model.transformer["num_layers"] == 2
    assert config.model.transformer["hidden_size"] == 4096
    config.check_machine(gpu=True)
    with pytest.raises(ValueError, match="train.dtype='bfloat16': CPU runs use float32"):
        config.check_machine(gpu=False)
