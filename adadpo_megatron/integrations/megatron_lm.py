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

import contextlib
import functools
import sys
from typing import Callable, Iterator, List, Optional

import torch

from adadpo_megatron.data.micro_batches import global_batch_indices
from adadpo_megatron.data.packing import MicroBatchPlan, materialize
from adadpo_megatron.integrations.megatron_lm_checks import (
    ArgumentError,
    add_arguments,
    check_architecture,
    check_config,
    check_flags,
    check_starting_weights,
    run_config,
)
from adadpo_megatron.integrations.megatron_lm_mends import (
    make_sgd_resumable,
    use_shipped_dataset_helpers,
)
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import (
    COUNTS,
    MAX_REDUCED,
    PreferenceForwardStep,
    SFTForwardStep,
)
from adadpo_megatron.mcore.model import canonical_init_, layer_spec, packed_format
from adadpo_megatron.micro_batch import MicroBatch
from adadpo_megatron.training.errors import USER_ERRORS, fail
from adadpo_megatron.training.layout import ParallelLayout
from adadpo_megatron.training.reference_cache import (
    attach_precomputed,
    default_cache_path,
    load_cache,
    reference_fingerprint,
)
from adadpo_megatron.training.run import RunData, load_run_data, plan_micro_batches
from adadpo_megatron.training.run_config import RunConfig

PROG = "adadpo_megatron.integrations.megatron_lm"
# the plug-in's public names, its checks (megatron_lm_checks) and mends (megatron_lm_mends)
# among them: a script imports this module alone
__all__ = [
    "ArgumentError", "ForwardStep", "StepMicroBatches", "add_arguments", "check_architecture",
    "check_config", "check_flags", "check_starting_weights", "config_container",
    "datasets_provider", "forward_step", "main", "make_sgd_resumable", "model_provider",
    "one_line_errors", "parse_args", "prepare", "run_config", "to_micro_batch_count",
    "use_shipped_dataset_helpers",
]


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
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    if config.pipeline_model_parallel_size > 1:
        config.variable_seq_lengths = True
    spec = layer_spec(args.transformer_impl == "transformer_engine", config)
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
        self.thd = _packed_format() == "thd"

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


def _packed_format() -> str:
    """How packed micro-batches reach the attention of model_provider's layer spec."""
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    return packed_format(args.transformer_impl == "transformer_engine",
                         core_transformer_config_from_args(args))


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
    process groups, built at its first call (after Megatron-LM initialised them).

    Its reports are made to read right in Megatron-LM's log, which divides each report's
    summed ``[value, count]`` over micro-batches and data- and context-parallel ranks: the
    totals (``pairs``, ``tokens``, ``adadpo/grad_ratio_pairs``) count each micro-batch's value
    once over CP and carry 1 / (micro-batches x DP x CP) as their count, so that they read as
    the global batch's totals; ``adadpo/coef_max``, a maximum, which no sum and division
    gives, is left out (adadpo-train logs it).
    """

    def __init__(self):
        self._step = None
        self._share = None  # each micro-batch's share of a total's count

    def _build(self):
        from megatron.core import parallel_state as ps

        config = _STATE.run_config()
        groups = dict(tp_group=ps.get_tensor_model_parallel_group(),
                      cp_group=ps.get_context_parallel_group(),
                      fused=config.model.fused_logprobs,
                      packed_format=_packed_format())
        if config.train.stage == "sft":
            return SFTForwardStep(**groups)
        return PreferenceForwardStep(
            config.loss, dp_group=ps.get_data_parallel_group(with_context_parallel=False),
            **groups)

    def __call__(self, data_iterator, model):
        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        if self._step is None:
            self._step = self._build()
        # adadpo-train reads a step's finiteness checks after it; Megatron-LM checks the
        # reduced loss itself, so each micro-batch starts afresh
        self._step.start_step()
        cp = ps.get_context_parallel_world_size()
        self._share = (cp, 1.0 / (get_num_microbatches()
                                  * ps.get_data_parallel_world_size(with_context_parallel=False)
                                  * cp))
        output, loss_func = self._step(data_iterator, model)
        return output, functools.partial(self._megatron_lm_report, loss_func)

    def _megatron_lm_report(self, loss_func, output_tensor):
        loss, count, report = loss_func(output_tensor)
        cp, share = self._share
        report = {name: value for name, value in report.items() if name not in MAX_REDUCED}
        for name in COUNTS:
            if name in report:
                value = report[name][0]
                report[name] = torch.stack([value / cp, torch.full_like(value, share)])
        return loss, count, report


forward_step = ForwardStep()


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
