"""What Megatron-LM's flags and the run config must be for AdaDPO inside Megatron-LM's loop
(adadpo_megatron.integrations.megatron_lm): each refusal names the flag or the key.

The run config (``--adadpo-config``) gives the data, the loss and the reference; the flags
give everything else. Where both speak of one thing the reference cache depends on (the
model's architecture, its precision, the sequence length, the weights a job starts from),
they must agree; the keys the planner needs from the flags (parallel sizes, batch sizes, the
seed, the steps) are set from them.
"""

from __future__ import annotations

import argparse
from typing import List

import torch

from adadpo_megatron.data.tokenizers import build_tokenizer
from adadpo_megatron.mcore.model import transformer_config
from adadpo_megatron.training.checkpointing.checkpoint import resolve_checkpoint
from adadpo_megatron.training.run_config import RunConfig, load_run_config


class ArgumentError(ValueError):
    """A Megatron-LM flag (or the run config's key) that the pair layout cannot take."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: the flags this plugin adds."""
    group = parser.add_argument_group("AdaDPO (adadpo_megatron)")
    group.add_argument("--adadpo-config", required=True, metavar="RUN.yaml",
                       help="the run config whose data, loss and reference sections to use "
                            "(the file adadpo-precompute-reference read)")
    group.add_argument("--adadpo-override", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                       help="overrides of --adadpo-config, as adadpo-train takes them")
    return parser


def flag_overrides(args) -> List[str]:
    """The run config's keys that Megatron-LM's flags decide, as overrides. (What the
    reference cache depends on, the precision and the sequence length, is compared instead:
    check_config.)"""
    sizes = {
        "parallel.tensor_model_parallel_size": args.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "parallel.virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
        "parallel.context_parallel_size": args.context_parallel_size,
        "parallel.expert_model_parallel_size": args.expert_model_parallel_size,
        "parallel.sequence_parallel": args.sequence_parallel,
        "train.global_batch_size": args.global_batch_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.seed": args.seed,
        "train.max_steps": args.train_iters,
        "train.num_epochs": None,  # --train-iters decides the steps
    }
    return [f"{key}={'null' if value is None else value}" for key, value in sizes.items()]


def check_flags(args) -> None:
    """Refuses, naming the flag, the Megatron-LM flags that break the pair layout or this
    plugin's place in Megatron-LM's loop (after Megatron-LM validated its arguments).

    Raises:
        ArgumentError: the first flag that cannot work.
    """
    if not args.calculate_per_token_loss:
        raise ArgumentError(
            "--calculate-per-token-loss is required: the loss returns its sum with the pair "
            "count, and Megatron-LM must divide the gradient by the pairs of the whole global "
            "batch (without it each micro-batch's loss is averaged alone)")
    if args.dataloader_type != "external":
        raise ArgumentError(
            f"--dataloader-type {args.dataloader_type}: use external (the default here); this "
            "plugin's planner builds each step's micro-batches, whole pairs in each")
    if args.train_samples is not None or args.train_iters is None:
        raise ArgumentError("--train-samples: give --train-iters (steps of "
                            "--global-batch-size pairs) instead")
    if args.eval_interval is None:
        raise ArgumentError("--eval-interval is required: Megatron-LM's loop counts its "
                            "evaluations from it even with --eval-iters 0")
    for flag, reason in _REFUSED_FLAGS:
        if _set(args, flag):
            raise ArgumentError(f"{flag}: {reason}")
    eval_micro = getattr(args, "eval_micro_batch_size", None) or args.micro_batch_size
    eval_global = getattr(args, "eval_global_batch_size", None) or args.global_batch_size
    if (eval_micro, eval_global) != (args.micro_batch_size, args.global_batch_size):
        raise ArgumentError(
            f"--eval-micro-batch-size {eval_micro} / --eval-global-batch-size {eval_global}: "
            "evaluations run the training batch sizes here (--micro-batch-size "
            f"{args.micro_batch_size}, --global-batch-size {args.global_batch_size})")
    if args.moe_aux_loss_coeff or args.moe_z_loss_coeff:
        raise ArgumentError(
            "--moe-aux-loss-coeff / --moe-z-loss-coeff: megatron-core scales the router's "
            "auxiliary losses by the tokens it assumes --calculate-per-token-loss divides by, "
            "but the loss here is divided by pairs (2 x seq-length times fewer): leave them 0 "
            "(adadpo-train keeps the pretrained routing, the router frozen)")


# (flag, why it is refused): flags Megatron-LM accepts whose effect the pair layout or this
# plug-in's data path does not have
_REFUSED_FLAGS = (
    ("--rampup-batch-size", "the global batch must stay fixed (the planner counts pairs a "
                            "step)"),
    ("--decrease-batch-size-if-needed", "the global batch must stay fixed"),
    ("--phase-transition-iterations", "the global batch must stay fixed"),
    ("--iterations-to-skip", "its dummy steps broadcast batches of Megatron-LM's own shapes, "
                             "not 2m rows of whole pairs"),
    ("--full-validation", "evaluations run --eval-iters global batches of the held-out pairs"),
    ("--multiple-validation-sets", "the held-out pairs are one set (data.eval_fraction)"),
    ("--sft", "it makes evaluate() average each micro-batch alone; the preference loss (or "
              "train.stage: sft in --adadpo-config) is this plug-in's"),
    ("--data-path", "the preference data is data.path in --adadpo-config"),
    ("--train-data-path", "the preference data is data.path in --adadpo-config"),
    ("--data-args-path", "the preference data is data.path in --adadpo-config"),
    ("--per-split-data-args-path", "the preference data is data.path in --adadpo-config"),
    ("--mock-data", "the preference data is data.path in --adadpo-config"),
    ("--reset-position-ids", "positions restart per sequence already (packed segments "
                             "included)"),
    ("--reset-attention-mask", "packed segments never attend to each other already"),
    ("--eod-mask-loss", "the loss reads response tokens only already"),
    ("--moe-layer-freq", "the model provider builds every layer alike; use adadpo-train for "
                         "mixed dense and expert layers"),
    ("--mtp-num-layers", "multi-token prediction has no preference loss"),
    ("--spec", "the model provider picks megatron-core's layer spec; pass your own "
               "model_provider to pretrain() for another"),
)


def _set(args, flag: str) -> bool:
    """Whether ``flag`` is given (not at Megatron-LM's default) in ``args``."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if flag == "--moe-layer-freq":
        return value not in (None, 1)
    return value not in (None, False, [], ())


def run_config(args) -> RunConfig:
    """--adadpo-config with --adadpo-override, then the keys Megatron-LM's flags decide
    (parallel sizes, batch sizes, seed, steps), checked as adadpo-train checks them, then
    against the flags (``check_config``: the sequence length, precision, vocabulary, ...);
    ``check_flags`` first."""
    check_flags(args)
    decided = flag_overrides(args)
    try:
        config = load_run_config(args.adadpo_config, list(args.adadpo_override) + decided)
    except (ValueError, OSError) as err:
        keys = [item.split("=")[0] for item in decided]
        where = (" (parallel.*, train.global_batch_size, micro_batch_size, seed and max_steps "
                 "come from Megatron-LM's flags)" if any(k in str(err) for k in keys) else "")
        raise ArgumentError(f"--adadpo-config {err}{where}") from err
    try:
        check_config(args, config)
    except OSError as err:  # the tokenizer's files
        raise ArgumentError(f"--adadpo-config {args.adadpo_config}: {err}") from err
    return config


def check_config(args, config: RunConfig) -> None:
    """Refuses, naming the flag and the key, a run config that Megatron-LM's flags or loop
    cannot take.

    Raises:
        ArgumentError: the first key that cannot work.
    """
    source = args.adadpo_config
    if args.use_distributed_optimizer and not torch.cuda.is_available():
        raise ArgumentError("--use-distributed-optimizer needs a GPU (its buffers assert CUDA "
                            "tensors); on CPU megatron-core's plain optimizer runs")
    if args.seq_length != config.data.seq_length:
        raise ArgumentError(
            f"--seq-length {args.seq_length} differs from data.seq_length "
            f"{config.data.seq_length} of {source}: the data is tokenised and the reference "
            "cache computed for the latter")
    # the reference cache is computed in the run config's precision: the flags must agree
    dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    if config.train.dtype != dtype:
        raise ArgumentError(
            f"{'--bf16' if args.bf16 else '--fp16' if args.fp16 else 'no --bf16/--fp16'} makes "
            f"the model {dtype}, but train.dtype is {config.train.dtype!r} in {source}: set "
            f"train.dtype={dtype} (adadpo-precompute-reference computes the reference in it)")
    fp8 = config.model.transformer.get("fp8")
    if (args.fp8 or None) != fp8:
        raise ArgumentError(
            f"--fp8-format {args.fp8} but model.fp8 {fp8!r} in {source}: set model.fp8 (and "
            "model.fp8_recipe) as the flags do; the reference and the micro-batch lengths "
            "depend on it")
    check_architecture(args, config)
    vocab = config_vocab_size(config)
    if args.padded_vocab_size < vocab:
        raise ArgumentError(
            f"the model's vocabulary ({args.padded_vocab_size}, from --vocab-size or the "
            f"tokenizer flags) is smaller than data.tokenizer's ({vocab}) in {source}")
    if config.data.eval_path is not None:
        raise ArgumentError(f"data.eval_path in {source}: inside Megatron-LM's loop the "
                            "evaluation pairs are held out of data.path (data.eval_fraction); "
                            "an evaluation set of its own is adadpo-train's")
    if args.eval_iters > 0 and not config.data.eval_fraction:
        raise ArgumentError(f"--eval-iters {args.eval_iters} needs held-out pairs: set "
                            f"data.eval_fraction in {source} (or pass --eval-iters 0)")
    mode = config.reference.mode
    if config.train.stage != "sft" and config.loss.needs_reference and mode != "precompute":
        raise ArgumentError(
            f"reference.mode={mode!r} in {source}: inside Megatron-LM's loop the reference is "
            "the precomputed cache (run adadpo-precompute-reference with this config, then "
            "set reference.mode=precompute); the loop runs one schedule per iteration and has "
            "no place for a second model's forward-only pass")
    if config.loss.updates_running_mean:
        raise ArgumentError(
            f"loss.loss_type={config.loss.loss_type!r} in {source} keeps a running mean "
            "across steps, which Megatron-LM's loop has no end-of-step hook to update; use "
            "adadpo-train")
    if config.model.lora is not None:
        raise ArgumentError(f"model.lora in {source}: LoRA runs in adadpo-train only (its "
                            "adapters-off reference is a second pass that Megatron-LM's loop "
                            "does not run)")


# (TransformerConfig field, the Megatron-LM flag that sets it, the argument it lands in):
# what the model the flags build and the run config's model section (the reference cache's)
# must agree on
ARCHITECTURE_FLAGS = (
    ("num_layers", "--num-layers", "num_layers"),
    ("hidden_size", "--hidden-size", "hidden_size"),
    ("ffn_hidden_size", "--ffn-hidden-size", "ffn_hidden_size"),
    ("num_attention_heads", "--num-attention-heads", "num_attention_heads"),
    ("kv_channels", "--kv-channels", "kv_channels"),
    ("normalization", "--normalization", "normalization"),
    ("layernorm_epsilon", "--norm-epsilon", "layernorm_epsilon"),
    ("gated_linear_unit", "--swiglu", "swiglu"),
    ("add_bias_linear", "--disable-bias-linear", "add_bias_linear"),
    ("add_qkv_bias", "--add-qkv-bias", "add_qkv_bias"),
    ("qk_layernorm", "--qk-layernorm", "qk_layernorm"),
    ("num_moe_experts", "--num-experts", "num_experts"),
)
MOE_FLAGS = (("moe_ffn_hidden_size", "--moe-ffn-hidden-size", "moe_ffn_hidden_size"),
             ("moe_router_topk", "--moe-router-topk", "moe_router_topk"))


def check_architecture(args, config: RunConfig) -> None:
    """The model Megatron-LM's flags build is the run config's model (whose reference the
    cache holds): each architecture field of the run config's megatron-core TransformerConfig
    against the (validated) flag that sets it, and the embedding's (RoPE base and scaling, a
    tied output layer).

    Raises:
        ArgumentError: naming the first flag that differs, with both values.
    """
    ours = transformer_config(config.model, config.parallel, dtype=torch.float32, gpu=False)
    m = config.model
    fields = ARCHITECTURE_FLAGS + (MOE_FLAGS if ours.num_moe_experts else ())
    pairs = [(flag, getattr(args, name), getattr(ours, field)) for field, flag, name in fields]
    pairs += [("--num-query-groups",
               args.num_query_groups if args.group_query_attention else args.num_attention_heads,
               ours.num_query_groups),
              ("--position-embedding-type", args.position_embedding_type,
               m.position_embedding_type),
              ("--rotary-base", args.rotary_base, m.rotary_base),
              ("--use-rope-scaling", bool(args.use_rope_scaling), m.rope_scaling),
              ("--untie-embeddings-and-output-weights",
               not args.untie_embeddings_and_output_weights,
               m.share_embeddings_and_output_weights)]
    if m.rope_scaling:
        pairs.append(("--rope-scaling-factor", args.rope_scaling_factor, m.rope_scaling_factor))
    for flag, flags_value, config_value in pairs:
        if flags_value != config_value:
            raise ArgumentError(
                f"{flag}: the flags build a model with {flags_value!r} where the model section "
                f"of {args.adadpo_config} (the reference's model) has {config_value!r}")


def check_starting_weights(args, config: RunConfig) -> None:
    """A fresh job (iteration 0) starts from the weights the run config says the policy
    starts from (model.load; the reference cache was computed from them or from
    reference.load): the checkpoint Megatron-LM loaded (``--load`` where it holds one, else
    ``--pretrained-checkpoint``) is model.load, and none is loaded without one. A resumed job
    continues its own checkpoint.

    Raises:
        ArgumentError: naming the flag and the key.
    """
    if args.iteration > 0:
        return
    from megatron.training.checkpointing import checkpoint_exists

    flag, loaded = None, None
    if args.load and checkpoint_exists(args.load):
        flag, loaded = "--load", args.load
    elif args.pretrained_checkpoint:
        flag, loaded = "--pretrained-checkpoint", args.pretrained_checkpoint
    m, source = config.model, args.adadpo_config
    if m.load is None:
        if loaded is not None and not m.hf:
            raise ArgumentError(
                f"{flag} {loaded}: the job starts from it, but the model section of {source} "
                "has no model.load (the reference is the initialisation's): set "
                f"model.load={loaded} and rerun adadpo-precompute-reference")
        if loaded is None and m.hf:
            raise ArgumentError(
                f"the job starts from random weights (no --pretrained-checkpoint), but the "
                f"model section of {source} starts from model.hf {m.hf}: pass that model, "
                "converted to a Megatron checkpoint, as --pretrained-checkpoint")
        return
    expected = resolve_checkpoint(config.resolve(m.load)).resolve()
    if loaded is None or resolve_checkpoint(loaded).resolve() != expected:
        raise ArgumentError(
            f"{flag or '--pretrained-checkpoint'} {loaded}: the job starts from "
            f"{'it' if loaded else 'random weights'}, but model.load in {source} (what the "
            f"reference and the policy start from) is {expected}: pass "
            f"--pretrained-checkpoint {m.load}")


def config_vocab_size(config: RunConfig) -> int:
    """data.tokenizer's vocabulary (unpadded)."""
    return build_tokenizer(config.tokenizer_spec()).vocab_size


