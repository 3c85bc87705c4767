"""AdaDPO inside Megatron-LM's own training loop: ``megatron.training.pretrain()``.

A Megatron-LM job keeps its flags for the model, the parallel layout, the optimizer, the
schedule, checkpoints and logging; this module adds the preference data, the loss and the
reference, from the project's run config (the YAML that adadpo-train and
adadpo-precompute-reference read: its ``data``, ``loss`` and ``reference`` sections)::

    import adadpo_megatron.integrations.megatron_lm as adadpo

    adadpo.prepare()
    with adadpo.one_line_errors():
        args = adadpo.parse_args()  # Megatron-LM's flags + --adadpo-config, checked
        pretrain(adadpo.config_container(args), adadpo.datasets_provider,
                 ModelType.encoder_or_decoder, adadpo.forward_step,
                 model_provider=adadpo.model_provider)

(examples/megatron_lm_pretrain.py), or ``python -m adadpo_megatron.integrations.megatron_lm
<Megatron-LM flags> --adadpo-config run.yaml`` (``main``). What it provides:

- ``prepare``: the CPU layer where there is no GPU, and two mends to Megatron-LM's loop as the
  megatron-core wheel ships it (its dataset-helper compile step, SGD resume).

- ``add_arguments``: ``--adadpo-config`` and ``--adadpo-override section.key=value ...``.
- ``check_flags`` / ``check_config`` / ``check_architecture``: the Megatron-LM flags the pair
  layout needs, refused before anything is built naming the flag (``--calculate-per-token-loss``,
  ``--dataloader-type external``, ``--seq-length`` equal to data.seq_length, a fixed global
  batch, the model of the run config's model section, ...); ``check_starting_weights``: a
  fresh job starts from model.load.
- ``model_provider``: megatron-core's GPTModel from Megatron-LM's flags (its own
  ``core_transformer_config_from_args``); on CPU initialised as adadpo-train initialises it.
- ``datasets_provider``: Megatron-LM's *external* data loader: iterators over this rank's
  micro-batches, planned step by step by this project's planner (padded rows, longest or
  packed, data.packing), resuming at Megatron-LM's iteration; the held-out pairs
  (data.eval_fraction) for its evaluations.
- ``forward_step``: ``PreferenceForwardStep`` (or ``SFTForwardStep``) on megatron-core's
  process groups; batch sizes count pairs, and with ``--calculate-per-token-loss`` Megatron-LM
  divides the gradient by the pair count the loss returns.

The reference is the precomputed cache (reference.mode precompute, checked against the run
config's fingerprint) or none (reference-free losses): Megatron-LM's loop runs one schedule per
iteration and has no place for the resident reference's forward-only pass, nor for LoRA's
adapters-off pass. docs/MEGATRON_LM.md has the launch, the logging and the differences from
adadpo-train.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch

from adadpo_megatron.data.micro_batches import global_batch_indices
from adadpo_megatron.data.packing import MicroBatchPlan, materialize
from adadpo_megatron.data.tokenizers import build_tokenizer
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import PreferenceForwardStep, SFTForwardStep
from adadpo_megatron.mcore.model import canonical_init_, transformer_config
from adadpo_megatron.mcore.packed_attention import default_packed_format
from adadpo_megatron.micro_batch import MicroBatch
from adadpo_megatron.training.checkpointing.checkpoint import init_sgd_state, resolve_checkpoint
from adadpo_megatron.training.errors import USER_ERRORS, fail
from adadpo_megatron.training.layout import ParallelLayout
from adadpo_megatron.training.reference_cache import (
    attach_precomputed,
    default_cache_path,
    load_cache,
    reference_fingerprint,
)
from adadpo_megatron.training.run import RunData, load_run_data, plan_micro_batches
from adadpo_megatron.training.run_config import RunConfig, load_run_config

PROG = "adadpo_megatron.integrations.megatron_lm"


class ArgumentError(ValueError):
    """A Megatron-LM flag (or the run config's key) that the pair layout cannot take."""


# ---------------------------------------------------------------------------- arguments

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


def parse_args(argv: Optional[List[str]] = None):
    """Megatron-LM's ``parse_and_validate_args`` with this plugin's flags and its default
    data loader (external), then ``run_config`` (which checks the flags and the config); sets
    Megatron-LM's global arguments. ``argv`` replaces ``sys.argv[1:]``."""
    from megatron.training.arguments import parse_and_validate_args

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(extra_args_provider=add_arguments,
                                   args_defaults={"dataloader_type": "external"})
    try:
        _STATE.config = run_config(args)
    except ArgumentError as err:
        err.on_every_rank = True  # every rank read the same flags and config
        raise
    return args


def config_container(args):
    """Megatron-LM's PretrainConfigContainer for ``args``."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    return pretrain_cfg_container_from_args(args)


class _State:
    """What the providers share within one process: the run config, set by parse_args."""

    config: Optional[RunConfig] = None
    planner: Optional[_Planner] = None

    def run_config(self) -> RunConfig:
        if self.config is None:  # a user's script that parsed the flags itself
            from megatron.training import get_args

            self.config = run_config(get_args())
        return self.config


_STATE = _State()


# ---------------------------------------------------------------------------- the model

def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None,
                   config=None, pg_collection=None):
    """Megatron-LM's model provider: megatron-core's GPTModel from Megatron-LM's flags.

    Transformer Engine's layers with ``--transformer-impl transformer_engine`` (its default),
    megatron-core's local ones with ``local`` (CPU). Pipeline stages exchange shapes, since a
    micro-batch of m pairs is 2m rows (or one packed row) rather than ``--micro-batch-size``.
    On CPU every weight is drawn as adadpo-train draws it (``canonical_init_`` with
    ``--seed``), so the two loops start from the same model on any layout. The router of an
    expert model stays frozen unless model.moe_train_router, as in adadpo-train.
    """
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    if config.pipeline_model_parallel_size > 1:
        config.variable_seq_lengths = True
    options = dict(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                   qk_layernorm=args.qk_layernorm)
    if args.transformer_impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**options)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**options)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
        vp_stage=vp_stage, **kwargs)
    if not _STATE.run_config().model.moe_train_router:
        for name, param in model.named_parameters():
            if ".mlp.router." in name:  # adadpo-train's default: the pretrained routing kept
                param.requires_grad_(False)
    if not torch.cuda.is_available():
        model.to(config.params_dtype)
        canonical_init_([model], config, args.seed)
    return model


# ---------------------------------------------------------------------------- the data

class StepMicroBatches:
    """This rank's micro-batches of consecutive steps, as adadpo-train plans them: an
    iterator for Megatron-LM's external data loader.

    Args:
        micro_batches: step -> this rank's micro-batches of that step.
        first_step: the step to start at (Megatron-LM's iteration on resume).
    """

    def __init__(self, micro_batches: Callable[[int], List[MicroBatch]], first_step: int):
        self._micro_batches = micro_batches
        self.step = first_step
        self._queue: List[MicroBatch] = []

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        if not self._queue:
            self._queue = list(self._micro_batches(self.step))
            self.step += 1
        return self._queue.pop(0)


class _Planner:
    """Each step's micro-batches of this data-parallel rank, counted as Megatron-LM counts
    them (``--global-batch-size / (--micro-batch-size x DP)``)."""

    def __init__(self, config: RunConfig, data: RunData, reference: Optional[torch.Tensor],
                 layout: ParallelLayout, dp_rank: int, micro_batches_per_step: int):
        self.config, self.data, self.reference = config, data, reference
        self.layout, self.dp_rank = layout, dp_rank
        self.count = micro_batches_per_step
        self.thd = default_packed_format(_uses_transformer_engine()) == "thd"

    def training(self, step: int) -> List[MicroBatch]:
        t = self.config.train
        indices = global_batch_indices(step, len(self.data.train_set), t.global_batch_size,
                                       t.seed)
        return self._micro_batches(self.data.train_set, indices, f"training step {step}")

    def evaluation(self, batch: int) -> List[MicroBatch]:
        """Held-out global batch ``batch``: the held-out pairs in order, cycling."""
        eval_set = self.data.eval_set
        size = self.config.train.global_batch_size
        indices = [(batch * size + i) % len(eval_set) for i in range(size)]
        return self._micro_batches(eval_set, indices, f"evaluation batch {batch}")

    def _micro_batches(self, dataset, indices, what: str) -> List[MicroBatch]:
        plan = plan_micro_batches(self.config, self.layout, dataset.lengths, indices,
                                  thd=self.thd, fill=self.config.data.packing == "pack")
        mine = to_micro_batch_count(plan[self.dp_rank], self.count, what)
        batches = [materialize(dataset, mb, pad_id=self.data.tokenizer.pad_id,
                               chosen_only=self.config.train.stage == "sft") for mb in mine]
        if self.reference is not None:
            attach_precomputed(batches, self.reference)
        return batches


def to_micro_batch_count(plan: List[MicroBatchPlan], count: int,
                         what: str) -> List[MicroBatchPlan]:
    """``plan`` as exactly ``count`` micro-batches: packing may need fewer (filler
    micro-batches, which count for nothing, make up the rest), never more."""
    if len(plan) > count:
        raise ArgumentError(
            f"{what} packs into {len(plan)} micro-batches on a data-parallel rank, more than "
            f"Megatron-LM's {count} (--global-batch-size / (--micro-batch-size x DP)): raise "
            "data.max_tokens_per_micro_batch or --micro-batch-size")
    fillers = [plan[-1].as_filler()] * (count - len(plan))
    return list(plan) + fillers


def _uses_transformer_engine() -> bool:
    from megatron.training import get_args

    return torch.cuda.is_available() and get_args().transformer_impl == "transformer_engine"


def _planner() -> _Planner:
    """This process's planner: the data loaded, the reference cache checked, once."""
    if _STATE.planner is None:
        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        from megatron.training import get_args

        config = _STATE.run_config()
        try:
            check_starting_weights(get_args(), config)
        except ArgumentError as err:
            err.on_every_rank = True  # the same flags and checkpoints on every rank
            raise
        try:
            data = load_run_data(config)
            reference = None
            if config.reference.mode == "precompute" and config.loss.needs_reference:
                fingerprint = reference_fingerprint(config, data.tokenizer, data.dataset,
                                                    data.sources)
                reference = load_cache(default_cache_path(config), fingerprint, data.dataset)
        except USER_ERRORS as err:  # the data, the tokenizer, the reference cache
            raise _plug_in_error(err) from err
        layout = ParallelLayout.of(config, torch.distributed.get_world_size())
        _STATE.planner = _Planner(config, data, reference, layout,
                                  ps.get_data_parallel_rank(with_context_parallel=False),
                                  get_num_microbatches())
    return _STATE.planner


def _plug_in_error(err: BaseException) -> ArgumentError:
    """``err`` as this plug-in's error (printed as one line), marked as it was."""
    wrapped = ArgumentError(str(err))
    wrapped.on_every_rank = getattr(err, "on_every_rank", False)
    return wrapped


def datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """Megatron-LM's datasets provider for ``--dataloader-type external``: (train, valid,
    test) iterators of this rank's micro-batches (valid None without --eval-iters, test
    None). Under interleaving Megatron-LM asks once per virtual stage (``vp_stage``); every
    stage's iterator yields the same micro-batches."""
    from megatron.training import get_args

    del train_val_test_num_samples, vp_stage  # steps are planned, not sampled
    args = get_args()
    if args.consumed_train_samples != args.iteration * args.global_batch_size:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size}: the checkpoint at iteration "
            f"{args.iteration} consumed {args.consumed_train_samples} pairs, another global "
            "batch; the pairs of each step follow from the global batch, so a change would "
            "skip or repeat pairs: resume with the checkpoint's --global-batch-size")
    planner = _planner()
    train = StepMicroBatches(planner.training, args.iteration)
    valid = None
    if args.eval_iters > 0:  # where the evaluations before a restart stopped
        first = getattr(args, "consumed_valid_samples", 0) // args.global_batch_size
        valid = StepMicroBatches(planner.evaluation, first)
    return train, valid, None


datasets_provider.is_distributed = True  # every rank builds its own (its pairs differ)


# ---------------------------------------------------------------------------- the loss

class ForwardStep:
    """Megatron-LM's ``forward_step_func``: the policy's forward step on megatron-core's
    process groups, built at its first call (after Megatron-LM initialised them)."""

    def __init__(self):
        self._step = None

    def _build(self):
        from megatron.core import parallel_state as ps

        config = _STATE.run_config()
        groups = dict(tp_group=ps.get_tensor_model_parallel_group(),
                      cp_group=ps.get_context_parallel_group(),
                      fused=config.model.fused_logprobs,
                      packed_format=default_packed_format(_uses_transformer_engine()))
        if config.train.stage == "sft":
            return SFTForwardStep(**groups)
        return PreferenceForwardStep(
            config.loss, dp_group=ps.get_data_parallel_group(with_context_parallel=False),
            **groups)

    def __call__(self, data_iterator, model):
        if self._step is None:
            self._step = self._build()
        # adadpo-train reads a step's finiteness checks after it; Megatron-LM checks the
        # reduced loss itself, so each micro-batch starts afresh
        self._step.start_step()
        return self._step(data_iterator, model)


forward_step = ForwardStep()


def use_shipped_dataset_helpers() -> bool:
    """Makes Megatron-LM's start-up use the dataset helpers the megatron-core wheel ships.

    ``initialize_megatron`` runs ``make`` in megatron/core/datasets on rank 0 and exits when
    it fails; the wheel ships the compiled ``helpers_cpp`` module but no Makefile, so
    pretrain() from the wheel stops there on any machine. Where the compiled module imports
    and the Makefile is absent, compiling is skipped; a source checkout compiles as before.

    Returns:
        whether the compile step is now skipped.
    """
    from megatron.core.datasets import utils as dataset_utils

    here = Path(dataset_utils.__file__).parent
    if (here / "Makefile").exists():
        return False
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return False
    dataset_utils.compile_helpers = _helpers_already_built
    return True


def _helpers_already_built() -> None:
    """megatron-core's compile_helpers where the wheel shipped them built."""


def make_sgd_resumable() -> None:
    """Lets Megatron-LM's load_checkpoint resume an SGD run.

    megatron-core 0.19.2 builds its SGD with no ``init_state_fn``, which its optimizer calls
    before loading a checkpoint's state (for Adam it creates the moments), so Megatron-LM's
    loop cannot resume any SGD run. The optimizer Megatron-LM builds gets the function
    adadpo-train uses: SGD's momentum buffers as zeros (what torch's first step is
    equivalent to). Idempotent.
    """
    from megatron.training import training

    build = training.get_megatron_optimizer
    if getattr(build, "_adadpo_sgd_resumable", False):
        return

    def get_megatron_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(inner, "init_state_fn", True) is None:
                inner.init_state_fn = init_sgd_state
        return optimizer

    get_megatron_optimizer._adadpo_sgd_resumable = True
    training.get_megatron_optimizer = get_megatron_optimizer


@contextlib.contextmanager
def one_line_errors(prog: str = PROG) -> Iterator[None]:
    """This plug-in's errors (a flag, a key, the data, the reference cache) as one line and
    exit code 2 (``ADADPO_TRACEBACK=1`` keeps the traceback); Megatron-LM's own errors keep
    theirs."""
    try:
        yield
    except ArgumentError as err:
        fail(prog, err)


def prepare() -> None:
    """What a script calls before Megatron-LM's: on a machine without a GPU, the CPU layer
    (megatron-core and megatron.training over gloo, ``cpu_compat``); the wheel's dataset
    helpers (``use_shipped_dataset_helpers``); SGD resume (``make_sgd_resumable``)."""
    if not torch.cuda.is_available():
        cpu_compat.enable()
    use_shipped_dataset_helpers()
    make_sgd_resumable()


def main(argv: Optional[List[str]] = None) -> None:
    """Megatron-LM's pretrain() with this plugin: ``python -m
    adadpo_megatron.integrations.megatron_lm <Megatron-LM flags> --adadpo-config RUN.yaml``."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    prepare()
    with one_line_errors():
        args = parse_args(argv)
        pretrain(config_container(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
