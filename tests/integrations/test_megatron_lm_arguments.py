"""The Megatron-LM flags and run-config keys that would break the pair layout, refused by
adadpo_megatron.integrations.megatron_lm before anything is built, each naming the flag or key.
The flags are parsed by Megatron-LM's own parser (megatron.training.arguments.parse_args)."""

from __future__ import annotations

import sys

import pytest
import yaml

from adadpo_megatron.integrations import megatron_lm
from adadpo_megatron.training.run_config import load_run_config
from tests.integrations.test_megatron_lm import _run_config, megatron_lm_flags

# what Megatron-LM's tokenizer set-up makes of --vocab-size 259 (padded to 128): adadpo-train's
PADDED_VOCAB = 384


def _args(monkeypatch, config, *extra, drop=(), world_size=2):
    """Megatron-LM's arguments for the flags, parsed and validated by Megatron-LM (as
    parse_and_validate_args does, without setting its globals), on ``world_size`` ranks."""
    from megatron.training.arguments import parse_args, validate_args

    megatron_lm.prepare()
    flags = [str(f) for f in megatron_lm_flags(config, *extra) if f not in drop]
    monkeypatch.setattr(sys, "argv", ["pretrain", *flags])
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    args = parse_args(megatron_lm.add_arguments)
    validate_args(args, {"dataloader_type": "external"})
    args.padded_vocab_size = PADDED_VOCAB
    return args


@pytest.fixture
def config(tmp_path):
    return _run_config(tmp_path)


def _with(config, section, **values):
    raw = yaml.safe_load(config.read_text())
    raw[section].update(values)
    config.write_text(yaml.safe_dump(raw))
    return config


def test_the_flags_of_the_suite_are_accepted_and_decide_the_run_config(monkeypatch, config):
    args = _args(monkeypatch, config, "--tensor-model-parallel-size", "2",
                 "--global-batch-size", "16", "--seed", "11")
    run = megatron_lm.run_config(args)
    assert run.parallel.tensor_model_parallel_size == 2
    assert (run.train.global_batch_size, run.train.seed, run.train.max_steps) == (16, 11, 3)
    assert run.loss.loss_type == "dpo" and run.reference.mode == "precompute"


@pytest.mark.parametrize("extra, drop, fragment", [
    ((), ("--calculate-per-token-loss",), "--calculate-per-token-loss is required"),
    (("--dataloader-type", "single"), (), "--dataloader-type single: use external"),
    (("--rampup-batch-size", "4", "4", "8"), (), "--rampup-batch-size"),
], ids=["per-token-loss", "dataloader", "rampup"])
def test_a_flag_that_breaks_the_pair_layout_is_refused_naming_it(monkeypatch, config, extra,
                                                                  drop, fragment):
    with pytest.raises(megatron_lm.ArgumentError, match=fragment):
        megatron_lm.run_config(_args(monkeypatch, config, *extra, drop=drop))


def test_no_eval_interval_is_refused_before_megatron_lm_divides_by_it(monkeypatch, config):
    args = _args(monkeypatch, config)
    args.eval_interval = None
    with pytest.raises(megatron_lm.ArgumentError, match="--eval-interval is required"):
        megatron_lm.run_config(args)


def test_a_sequence_length_other_than_the_datas_is_refused_naming_both(monkeypatch, config):
    args = _args(monkeypatch, config, "--seq-length", "48", "--max-position-embeddings", "48")
    with pytest.raises(megatron_lm.ArgumentError,
                       match=r"--seq-length 48 differs from data.seq_length 24 of .*run.yaml"):
        megatron_lm.run_config(args)


def test_a_packed_step_is_made_megatron_lms_micro_batch_count_or_refused():
    """Megatron-LM runs --global-batch-size / (--micro-batch-size x DP) micro-batches a step:
    a packed step that needs fewer is topped up with fillers (which count for nothing), one
    that needs more is refused naming the keys that give it room."""
    from adadpo_megatron.data.packing import MicroBatchPlan

    plan = [MicroBatchPlan(pairs=(i,), rows=2, length=24, real_tokens=40) for i in range(3)]
    topped = megatron_lm.to_micro_batch_count(plan, 4, "training step 0")
    assert topped[:3] == plan and topped[3].filler and topped[3].real_tokens == 0
    with pytest.raises(megatron_lm.ArgumentError,
                       match=r"training step 0 packs into 3 micro-batches .* Megatron-LM's 2 "
                             r".*data.max_tokens_per_micro_batch or --micro-batch-size"):
        megatron_lm.to_micro_batch_count(plan, 2, "training step 0")


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(monkeypatch, config):
    args = _args(monkeypatch, config)
    args.padded_vocab_size = 256
    with pytest.raises(megatron_lm.ArgumentError, match=r"vocabulary \(256.*\(259\)"):
        megatron_lm.run_config(args)


@pytest.mark.parametrize("section, values, fragment", [
    ("reference", {"mode": "resident"}, "reference.mode='resident'"),
    ("loss", {"loss_type": "bco_pair"}, "loss.loss_type='bco_pair' .* running mean"),
    ("data", {"eval_fraction": 0.0}, "--eval-iters 1 needs held-out pairs"),
], ids=["resident", "bco_pair", "no-held-out"])
def test_a_run_config_the_loop_cannot_take_is_refused_naming_the_key(monkeypatch, config,
                                                                     section, values, fragment):
    args = _args(monkeypatch, _with(config, section, **values), "--eval-iters", "1")
    with pytest.raises(megatron_lm.ArgumentError, match=fragment):
        megatron_lm.run_config(args)


def test_a_reference_free_loss_needs_no_cache(monkeypatch, config):
    """SimPO reads no reference: reference.mode none passes, no cache is needed."""
    _with(config, "reference", mode="none", cache_path=None)
    args = _args(monkeypatch, _with(config, "loss", loss_type="simpo", beta=2.0,
                                    adaptive=False))
    assert megatron_lm.run_config(args).loss.needs_reference is False


def test_a_precision_other_than_the_run_configs_is_refused_naming_both(monkeypatch, config):
    """The reference cache is computed in train.dtype: --bf16 over a float32 run config would
    compare a bf16 policy with a float32 reference (or fail later as a stale cache)."""
    args = _args(monkeypatch, config, "--bf16")
    with pytest.raises(megatron_lm.ArgumentError,
                       match=r"--bf16 makes the model bfloat16, but train.dtype is 'float32'"):
        megatron_lm.run_config(args)


@pytest.mark.parametrize("extra, fragment", [
    (("--full-validation",), "--full-validation: evaluations run --eval-iters"),
    (("--iterations-to-skip", "2"), "--iterations-to-skip: its dummy steps"),
    (("--data-path", "/data/corpus"), "--data-path: the preference data is data.path"),
    (("--sft",), "--sft: it makes evaluate"),
    (("--eval-micro-batch-size", "1"), "--eval-micro-batch-size 1 / --eval-global-batch-size"),
    (("--moe-aux-loss-coeff", "0.01"), "--moe-aux-loss-coeff / --moe-z-loss-coeff"),
], ids=["full-validation", "iterations-to-skip", "data-path", "sft", "eval-batch", "aux-loss"])
def test_a_flag_whose_effect_the_plug_in_does_not_have_is_refused(monkeypatch, config, extra,
                                                                  fragment):
    """Flags Megatron-LM accepts but the pair layout or the plug-in's data path would ignore
    or break (a wrongly scaled router loss, batches of Megatron-LM's own shapes, another
    data set)."""
    with pytest.raises(megatron_lm.ArgumentError, match=fragment):
        megatron_lm.run_config(_args(monkeypatch, config, *extra))


@pytest.mark.parametrize("extra, fragment", [
    (("--rotary-base", "500000"), "--rotary-base: the flags build a model with 500000 where "
                                  "the model section of .* has 10000"),
    (("--ffn-hidden-size", "128"), "--ffn-hidden-size: .* 128 .* has 64"),
    (("--norm-epsilon", "1e-3"), "--norm-epsilon: .* 0.001 .* has 1e-05"),
], ids=["rotary-base", "ffn", "norm-epsilon"])
def test_a_model_other_than_the_reference_caches_is_refused(monkeypatch, config, extra,
                                                           fragment):
    """The reference cache was computed for the run config's model section: the model the
    flags build must be that architecture (issue 25 review: a changed RoPE base or epsilon
    was accepted and trained against a reference of another model)."""
    with pytest.raises(megatron_lm.ArgumentError, match=fragment):
        megatron_lm.run_config(_args(monkeypatch, config, *extra))


def test_a_fresh_job_starts_from_model_load_or_is_refused(monkeypatch, config, tmp_path):
    """A fresh job (iteration 0) must start from the checkpoint the reference and the policy
    are declared to start from (model.load); no checkpoint where model.load is set, or one where
    the run config starts from the initialisation, is refused naming the flag and the key."""
    base = tmp_path / "base"
    (base / "iter_0000001").mkdir(parents=True)
    (base / "iter_0000001" / "metadata.json").write_text("{}")
    (base / "latest_checkpointed_iteration.txt").write_text("1")
    args = _args(monkeypatch, config)
    args.iteration = 0
    run = megatron_lm.run_config(args)
    args.pretrained_checkpoint = str(base)
    with pytest.raises(megatron_lm.ArgumentError,
                       match=r"--pretrained-checkpoint .*base: the job starts from it, but "
                             r"the model section .* has no model.load"):
        megatron_lm.check_starting_weights(args, run)
    with_load = load_run_config(config, [f"model.load={base}"])
    megatron_lm.check_starting_weights(args, with_load)  # the same checkpoint: accepted
    args.pretrained_checkpoint = None
    with pytest.raises(megatron_lm.ArgumentError, match=r"starts from random weights, but "
                                                        r"model.load"):
        megatron_lm.check_starting_weights(args, with_load)
    args.iteration = 5  # a resumed job continues its own checkpoint
    megatron_lm.check_starting_weights(args, with_load)


def test_resuming_with_another_global_batch_is_refused(monkeypatch, config):
    """Step s takes pairs s x global batch on: a checkpoint that consumed another global
    batch a step would skip or repeat pairs (Megatron-LM itself allows the change)."""
    from megatron.training import global_vars

    args = _args(monkeypatch, config)
    args.iteration, args.consumed_train_samples = 2, 32  # saved with --global-batch-size 16
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    with pytest.raises(megatron_lm.ArgumentError,
                       match=r"--global-batch-size 8: the checkpoint at iteration 2 consumed "
                             r"32 pairs"):
        megatron_lm.datasets_provider(None)
