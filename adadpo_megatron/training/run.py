"""A run once set up: its parallel world, data, model building and schedule call.

``setup_run`` returns one frozen ``RunContext`` that training and precomputing the reference
each hold (composition: neither inherits it):

    run = setup_run(load_run_config("configs/tiny_cpu.yaml"))   # distributed, groups, data
    reference = run.build_reference()
    plan = run.plan(run.data.dataset, range(8), fill=True)
    reports = run.forward_only(run.reference_step, reference, run.materialize(..., plan))
    run.close()

``Trainer`` (adadpo_megatron.training.trainer) adds the policy, its optimizer and the loop.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from adadpo_megatron.data.micro_batches import global_batch_indices, split_held_out
from adadpo_megatron.data.packing import PACKING_MODES, materialize, plan_step, step_token_counts
from adadpo_megatron.data.preference_data import (
    DataReport,
    PreferenceDataset,
    load_preference_data,
)
from adadpo_megatron.data.tokenizers import build_tokenizer
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import ReferenceForwardStep, require_output_processor_hook
from adadpo_megatron.mcore.lora import init_adapters_, is_adapter_name
from adadpo_megatron.mcore.model import (
    build_model_chunks,
    canonical_init_,
    model_vocab_size,
    packed_format,
    transformer_config,
    uses_transformer_engine,
    variable_shapes,
)
from adadpo_megatron.micro_batch import MicroBatch
from adadpo_megatron.training.checkpointing.checkpoint import load_model_weights
from adadpo_megatron.training.checkpointing.fingerprints import source_fingerprints
from adadpo_megatron.training.checkpointing.run_dir import (
    RunDirectoryError,
    RunDirectoryLock,
    prepare_fresh_run,
)
from adadpo_megatron.training.huggingface.hf_import import IMPORT_DIR, import_into
from adadpo_megatron.training.layout import ParallelLayout, ProcessGroups
from adadpo_megatron.training.notices import environment_line
from adadpo_megatron.training.process_groups import computed_on_rank_zero, init_distributed
from adadpo_megatron.training.reference_cache import attach_precomputed, reference_weights_path
from adadpo_megatron.training.run_config import RunConfig


def plan_micro_batches(config: RunConfig, layout: ParallelLayout, lengths: torch.Tensor,
                       indices, *, thd: bool, mode: Optional[str] = None, fill: bool = False):
    """Every data-parallel rank's micro-batches for the pairs ``indices`` (adadpo_megatron.data
    .packing.plan_step), laid out as ``mode`` (default data.packing) says for this config and
    layout; with ``fill`` (an evaluation, a reference pass) padded with filler micro-batches
    to what the schedule needs. ``lengths``: [N, 2] tokens of each sequence; ``thd``: packed
    micro-batches are one THD sequence (Transformer Engine)."""
    c = config
    return plan_step(lengths, indices, mode=mode or c.data.packing, fill=fill,
                     dp_size=layout.dp, micro_batch_size=c.train.micro_batch_size,
                     seq_length=c.data.seq_length,
                     multiple=layout.sequence_multiple(c.fp8_multiple),
                     segment_multiple=layout.segment_multiple, sides=c.train.sides,
                     max_tokens=c.micro_batch_tokens(), one_sequence=thd,
                     micro_batch_multiple=layout.micro_batch_multiple)


@dataclass(frozen=True)
class RunData:
    """The run's tokenised data.

    Fields:
        tokenizer: the tokenizer (its files' fingerprint computed once, on rank 0).
        dataset: every pair loaded; ``train_set`` and ``eval_set`` (None without
            data.eval_fraction) its seeded split.
        report: what loading counted (rows, pairs, skipped, truncated).
        sources: ``source_fingerprints`` of the tokenizer and weight files.
    """

    tokenizer: Any
    dataset: PreferenceDataset
    train_set: PreferenceDataset
    eval_set: Optional[PreferenceDataset]
    report: DataReport
    sources: Dict[str, str]


@dataclass(frozen=True)
class RunContext:
    """What a run has once set up (``setup_run``), shared by training and precompute.

    Fields:
        config: the run config.
        gpu: whether this process drives a GPU.
        layout: the parallel layout; ``groups`` this rank's process groups in it.
        data: the tokenised data.
        vocab_size: the model's (padded) vocabulary.
        dtype: the parameters' dtype.
        packed_format: how attention sees packed segments (mcore.model.packed_format):
            "thd" (Transformer Engine's or SDPADotProductAttention) or "mask" (the local
            context-parallel attention, megatron-core's own local one).
        forward_backward: megatron-core's schedule for the layout.
        lock: the output directory's lock, where the run claimed it (training).
    """

    config: RunConfig
    gpu: bool
    layout: ParallelLayout
    groups: ProcessGroups
    data: RunData
    vocab_size: int
    dtype: torch.dtype
    packed_format: Optional[str]
    forward_backward: Callable
    lock: Optional[RunDirectoryLock] = None

    @property
    def sft(self) -> bool:
        return self.config.train.stage == "sft"

    def reference_step(self) -> ReferenceForwardStep:
        """The reference's forward step (sums LD-weighted as the loss's ld_alpha says)."""
        c, g = self.config, self.groups
        return ReferenceForwardStep(tp_group=g.tp, cp_group=g.cp, fused=c.model.fused_logprobs,
                                    packed_format=self.packed_format,
                                    ld_alpha=None if self.sft else c.loss.ld_alpha)

    # ------------------------------------------------------------------ micro-batches

    def plan(self, dataset: PreferenceDataset, indices, mode: Optional[str] = None,
             fill: bool = False):
        """Every data-parallel rank's micro-batches for the pairs ``indices`` of ``dataset``
        (``plan_micro_batches``)."""
        return plan_micro_batches(self.config, self.layout, dataset.lengths, indices,
                                  thd=self.packed_format == "thd", mode=mode, fill=fill)

    def materialize(self, dataset: PreferenceDataset, plan,
                    reference_logps: Optional[torch.Tensor] = None) -> List[MicroBatch]:
        """This rank's micro-batches of ``plan``, with precomputed reference sums
        (``load_cache``'s by-row table) attached when given."""
        batches = [materialize(dataset, mb, pad_id=self.data.tokenizer.pad_id,
                               chosen_only=self.sft) for mb in plan[self.groups.dp_rank]]
        if reference_logps is not None:
            attach_precomputed(batches, reference_logps)
        return batches

    def step_plan(self, step: int, mode: Optional[str] = None):
        """Every data-parallel rank's micro-batches of training step ``step``."""
        t = self.config.train
        indices = global_batch_indices(step, len(self.data.train_set), t.global_batch_size,
                                       t.seed)
        return self.plan(self.data.train_set, indices, mode)

    def real_token_fraction(self, steps: range, mode: Optional[str] = None) -> float:
        """Real tokens per computed token over the training steps ``steps``, all ranks."""
        counts = [step_token_counts(self.step_plan(step, mode)) for step in steps]
        return sum(r for r, _ in counts) / sum(c for _, c in counts)

    # ------------------------------------------------------------------ the schedule

    def run_schedule(self, step_func, model: List[torch.nn.Module], batches: List[MicroBatch],
                     forward_only: bool):
        """megatron-core's forward-backward over ``batches``; the last stage's reports.

        Micro-batches may differ in shape: pipeline stages then exchange shapes first
        (``variable_shapes``). The interleaved schedule needs their count to be a multiple of
        the pipeline size (the planner's micro_batch_multiple).
        """
        shapes = {step_func.schedule_shape(batch) for batch in batches}
        with variable_shapes(model, needed=len(shapes) > 1):
            return self._schedule(step_func, model, batches, forward_only)

    def _schedule(self, step_func, model, batches, forward_only: bool):
        rows, length = step_func.schedule_shape(batches[0])
        chunks = model if len(model) > 1 else model[0]
        iterators = ([iter(batches) for _ in model] if len(model) > 1 else iter(batches))
        return self.forward_backward(
            forward_step_func=step_func,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=len(batches),
            seq_length=length,
            micro_batch_size=rows,  # sequences (rows) per micro-batch, or 1 for THD
            forward_only=forward_only,
        )

    def forward_only(self, step_func, model, batches) -> list:
        """run_schedule forward-only, without autograd."""
        with torch.no_grad():
            return self.run_schedule(step_func, model, batches, forward_only=True) or []

    # ------------------------------------------------------------------ models

    def build_model(self, frozen: bool) -> List[torch.nn.Module]:
        """This rank's model chunks: DDP-wrapped for the policy (with model.lora's adapters),
        frozen and in eval mode for a reference."""
        from megatron.core.distributed import (  # megatron-core: imported on use
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )

        c = self.config
        # pipeline stages exchange shapes first where a step's micro-batches differ in length
        # (longest, pack); an evaluation's short last micro-batch turns it on for its call
        config = transformer_config(c.model, c.parallel, dtype=self.dtype, gpu=self.gpu,
                                    variable_seq_lengths=c.data.packing != "none")
        lora = None if frozen else c.model.lora
        chunks = build_model_chunks(c.model, config, self.vocab_size, c.data.seq_length,
                                    gpu=self.gpu, lora=lora)
        if self.gpu:
            for chunk in chunks:
                chunk.cuda(torch.cuda.current_device())
        else:
            canonical_init_(chunks, config, c.train.seed)
        if lora is not None:
            init_adapters_(chunks, c.train.seed)
        if frozen:
            for chunk in chunks:
                chunk.eval()
                chunk.requires_grad_(False)
            return chunks
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=c.optimizer.distributed(self.gpu),
        )
        return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                        disable_bucketing=i > 0)
                for i, chunk in enumerate(chunks)]

    def load_initial_weights(self, chunks: List[torch.nn.Module]) -> None:
        """model.load's weights, or model.hf's (imported once into output_dir/hf_import and
        cached there); nothing without either (the initialisation stays)."""
        c = self.config
        if c.model.load:
            load_model_weights(chunks, c.resolve(c.model.load))
        elif c.model.hf:
            import_into(chunks, c.resolve(c.model.hf), Path(c.train.output_dir) / IMPORT_DIR,
                        fingerprint={"weights": self.data.sources["model.hf"]})

    def build_reference(self, policy: Optional[List[torch.nn.Module]] = None
                        ) -> List[torch.nn.Module]:
        """This rank's frozen reference chunks, with the reference's weights.

        Those of reference.load or model.load when set; otherwise the policy's initial
        weights: copied from ``policy`` when given (whatever the device's initialisation
        order), else the initialisation itself (precompute builds the reference alone,
        right after seeding, as the trainer builds the policy) or model.hf's.
        """
        chunks = self.build_model(frozen=True)
        path = reference_weights_path(self.config)
        if path:
            load_model_weights(chunks, path)
        elif policy:  # the policy's base (the policy itself unless it has adapters)
            for reference, chunk in zip(chunks, policy, strict=True):
                reference.load_state_dict({k: v for k, v in chunk.module.state_dict().items()
                                           if not is_adapter_name(k)})
        else:
            self.load_initial_weights(chunks)
        return chunks

    def close(self) -> None:
        """Releases the output directory and megatron-core's groups."""
        if self.lock is not None:
            self.lock.release()
        ParallelLayout.destroy()


def setup_run(config: RunConfig, claim_output_dir: bool = False) -> RunContext:
    """Distributed, the layout's process groups, seeds and the tokenised data; with
    ``claim_output_dir``, first the run directory's lock (and, for resume=never, the check that
    it holds no other run), before anything is built."""
    from megatron.core.pipeline_parallel import get_forward_backward_func  # on use

    c = config
    gpu = torch.cuda.is_available()
    world = (dist.get_world_size() if dist.is_initialized()
             else int(os.environ.get("WORLD_SIZE", "1")))
    layout = c.check_world(world, gpu=gpu)
    timeout = c.train.distributed_timeout_minutes
    init_distributed(gpu, timeout)
    lock = _claim_output_dir(c) if claim_output_dir else None
    try:
        if not gpu:
            cpu_compat.enable()  # megatron-core on CPU, whatever it imports later
        # every subgroup megatron-core creates (TP, PP, DP, ...) waits this long too
        groups = layout.build(timeout_minutes=timeout)
        torch.manual_seed(c.train.seed)
        if gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(c.train.seed)
        data = load_run_data(c)
        if c.train.max_steps is None:  # train.num_epochs: the steps follow from the data
            c.train.max_steps = c.train.steps_for_epochs(len(data.train_set))
            if dist.get_rank() == dist.get_world_size() - 1:
                print(f"train.num_epochs={c.train.num_epochs}: {len(data.train_set)} training "
                      f"pairs, {c.train.global_batch_size} a step -> train.max_steps="
                      f"{c.train.max_steps}", flush=True)
        if c.model.fused_logprobs:
            require_output_processor_hook()
        dtype = getattr(torch, c.train.dtype)
        run = RunContext(
            config=c, gpu=gpu, layout=layout, groups=groups, data=data,
            vocab_size=model_vocab_size(data.tokenizer.vocab_size, c.model, layout.tp),
            dtype=dtype,
            packed_format=packed_format(uses_transformer_engine(gpu), transformer_config(
                c.model, c.parallel, dtype=dtype, gpu=gpu)),
            forward_backward=get_forward_backward_func(), lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        ParallelLayout.destroy()
        raise
    if groups.is_logging_rank:
        line = environment_line(gpu)
        if line:
            print(line, flush=True)
        print(f"packing: {_packing_report(run)}", flush=True)
    return run


def _claim_output_dir(config: RunConfig) -> Optional[RunDirectoryLock]:
    """Rank 0 locks output_dir and checks it (its lock returned there, None elsewhere); every
    rank raises the same error."""
    t = config.train

    def claim() -> RunDirectoryLock:
        lock = RunDirectoryLock(t.output_dir)
        lock.acquire()
        try:
            if t.resume == "never":
                prepare_fresh_run(t.output_dir, t.overwrite)
        except RunDirectoryError:
            lock.release()
            raise
        return lock

    return computed_on_rank_zero(claim, errors=(RunDirectoryError,), share_result=False)


def load_run_data(c: RunConfig) -> RunData:
    """The tokenizer and the tokenised data. What identifies the tokenizer and weight files
    is read on rank 0 for all (a restart of a 70B job must not read the model directory on
    every rank); rank 0 then reads and tokenises (writing the cache) first, the others read
    the cache: a bad row raises the same error on every rank instead of a hang."""
    sources = computed_on_rank_zero(lambda: source_fingerprints(c))
    tokenizer = build_tokenizer(c.tokenizer_spec(), fingerprint=sources.get("data.tokenizer"))
    dataset, report = _read_pairs(c, tokenizer, c.data_source(), c.data.settings(),
                                  key="data.path", label="data")
    if c.data.eval_path is None:
        train_set, eval_set = split_held_out(dataset, c.data.eval_fraction, c.eval_seed)
    else:
        train_set, eval_set = dataset, _load_eval_set(c, tokenizer)
    if len(train_set) < c.train.global_batch_size and dist.get_rank() == 0:
        print(f"adadpo-train: warning: {len(train_set)} training pairs, fewer than "
              f"train.global_batch_size={c.train.global_batch_size}: pairs repeat within "
              "every step", file=sys.stderr, flush=True)
    return RunData(tokenizer=tokenizer, dataset=dataset, train_set=train_set,
                   eval_set=eval_set, report=report, sources=sources)


def _load_eval_set(c: RunConfig, tokenizer) -> PreferenceDataset:
    """data.eval_path's pairs, read as data.path's are."""
    settings = dataclasses.replace(c.data.settings(), split=c.data.eval_split or c.data.split)
    eval_set, _ = _read_pairs(c, tokenizer, c.eval_source(), settings, key="data.eval_path",
                              label="eval data", warning_prefix="data.eval_path: ")
    return eval_set


def _read_pairs(c: RunConfig, tokenizer, source: str, settings, *, key: str, label: str,
                warning_prefix: str = ""):
    """(dataset, report) of ``source`` (the config key ``key``): rank 0 reads and tokenises
    (writing the cache) first, the others then read the cache, so a bad row raises the same
    error on every rank instead of a hang; the last rank prints the report and its
    warnings."""

    def load():
        return load_preference_data(source, tokenizer, settings, cache=c.data.cache, key=key)

    # rank 0's result stays there (only its errors travel); the others then read the cache
    first = computed_on_rank_zero(load, share_result=False)
    dataset, report = first if dist.get_rank() == 0 else load()
    if dist.get_rank() == dist.get_world_size() - 1:
        print(f"{label}: {source}: {report}", flush=True)
        for line in report.warnings(settings):
            print(f"adadpo-train: warning: {warning_prefix}{line}", file=sys.stderr,
                  flush=True)
    return dataset, report


def _packing_report(run: RunContext) -> str:
    """The real-token share of each packing mode on the first steps of the loaded data."""
    steps = range(min(run.config.train.max_steps, 8))
    text = ", ".join(f"{mode} {run.real_token_fraction(steps, mode):.2f}"
                     for mode in PACKING_MODES)
    return (f"real tokens per computed token over the first {len(steps)} steps: {text} "
            f"(data.packing={run.config.data.packing})")
