"""A run's parallel world, data and models: what training and precomputing the reference share.

    run = Run(load_run_config("configs/tiny_cpu.yaml"))
    run.setup_common()               # distributed, parallel_state, seeds, tokenised data
    reference = run.build_reference()
    reports = run.run_schedule(run.reference_step, reference, batches, forward_only=True)
    run.close()

``Trainer`` (adadpo_megatron.training.trainer) adds the policy's optimizer and the loop;
``precompute_reference`` uses a Run alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from adadpo_megatron.data.micro_batches import global_batch_indices, split_held_out
from adadpo_megatron.data.packing import PACKING_MODES, materialize, plan_step, step_token_counts
from adadpo_megatron.data.preference_data import load_preference_data
from adadpo_megatron.data.tokenizers import build_tokenizer
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import ReferenceForwardStep, require_output_processor_hook
from adadpo_megatron.mcore.lora import init_adapters_, is_adapter_name
from adadpo_megatron.mcore.model import (
    build_model_chunks,
    canonical_init_,
    model_vocab_size,
    transformer_config,
    uses_transformer_engine,
)
from adadpo_megatron.mcore.packed_attention import default_packed_format
from adadpo_megatron.training.checkpoint import load_model_weights
from adadpo_megatron.training.fingerprints import source_fingerprints
from adadpo_megatron.training.process_groups import computed_on_rank_zero, init_distributed
from adadpo_megatron.training.reference_cache import attach_precomputed, reference_weights_path
from adadpo_megatron.training.run_config import RunConfig
from adadpo_megatron.training.run_dir import (
    RunDirectoryError,
    RunDirectoryLock,
    prepare_fresh_run,
)


def plan_micro_batches(config: RunConfig, lengths: torch.Tensor, indices, *, dp_size: int,
                       thd: bool, mode: Optional[str] = None, fill: bool = False):
    """Every data-parallel rank's micro-batches for the pairs ``indices`` (adadpo_megatron.data
    .packing.plan_step), laid out as ``mode`` (default data.packing) says for this config's
    layout; with ``fill`` (an evaluation) padded with filler micro-batches to what the
    schedule needs. ``lengths``: [N, 2] tokens of each sequence; ``thd``: packed micro-batches
    are one THD sequence (Transformer Engine)."""
    c = config
    return plan_step(lengths, indices, mode=mode or c.data.packing, fill=fill, dp_size=dp_size,
                     micro_batch_size=c.train.micro_batch_size, seq_length=c.data.seq_length,
                     multiple=c.sequence_multiple(), segment_multiple=c.segment_multiple(),
                     sides=c.sides(), max_tokens=c.micro_batch_tokens(), one_sequence=thd,
                     micro_batch_multiple=c.micro_batch_multiple())


class Run:
    """The parallel layout, data and model building of one run config.

    After ``setup_common()``: ``dp_size``, ``dp_rank``, ``is_last_stage``,
    ``is_logging_rank``, ``sources`` (source_fingerprints), ``tokenizer``, ``dataset`` (with
    ``train_set`` and ``eval_set``),
    ``vocab_size``, ``dtype``, ``packed_format``, ``reference_step`` and megatron-core's
    ``forward_backward``.
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.gpu = torch.cuda.is_available()
        self.model: List[torch.nn.Module] = []
        self.reference_model: List[torch.nn.Module] = []
        self.reference_logps: Optional[torch.Tensor] = None

    def _claim_output_dir(self) -> None:
        """Rank 0 locks output_dir and checks it; every rank raises the same error."""
        t = self.config.train
        self.run_lock = None
        error = None
        if dist.get_rank() == 0:
            try:
                self.run_lock = RunDirectoryLock(t.output_dir)
                self.run_lock.acquire()
                if t.resume == "never":
                    prepare_fresh_run(t.output_dir, t.overwrite)
            except RunDirectoryError as err:
                error = str(err)
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            if self.run_lock is not None:
                self.run_lock.release()
            raise RunDirectoryError(verdict[0])

    def setup_common(self, claim_output_dir: bool = False) -> None:
        """Distributed, megatron-core's parallel state, seeds and the tokenised data; with
        ``claim_output_dir``, first the run directory's lock (and, for resume=never, the
        check that it holds no other run), before anything is built."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        c = self.config
        world = (dist.get_world_size() if dist.is_initialized()
                 else int(os.environ.get("WORLD_SIZE", "1")))
        self.dp_size = c.check_world(world, gpu=self.gpu)
        timeout = c.train.distributed_timeout_minutes
        init_distributed(self.gpu, timeout)
        if claim_output_dir:
            self._claim_output_dir()
        if not self.gpu:
            cpu_compat.enable()  # megatron-core on CPU, whatever it imports later
        p = c.parallel
        parallel_state.initialize_model_parallel(
            **p.megatron_sizes(),
            # every subgroup megatron-core creates (TP, PP, DP, ...) waits this long too
            distributed_timeout_minutes=timeout,
        )
        torch.manual_seed(c.train.seed)
        if self.gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(c.train.seed)
        # what identifies the tokenizer and weight files, read on one rank for all: a restart
        # of a 70B job must not read the model directory on every rank
        self.sources = computed_on_rank_zero(lambda: source_fingerprints(c))
        self.tokenizer = build_tokenizer(c.tokenizer_spec(),
                                         fingerprint=self.sources.get("data.tokenizer"))
        self.dataset, self.data_report = self._load_data()
        self.train_set, self.eval_set = split_held_out(self.dataset, c.data.eval_fraction,
                                                       c.eval_seed)
        if len(self.train_set) < c.train.global_batch_size and dist.get_rank() == 0:
            print(f"adadpo-train: warning: {len(self.train_set)} training pairs, fewer than "
                  f"train.global_batch_size={c.train.global_batch_size}: pairs repeat within "
                  "every step", file=sys.stderr, flush=True)
        self.vocab_size = model_vocab_size(self.tokenizer.vocab_size, c.model,
                                           p.tensor_model_parallel_size)
        self.dtype = getattr(torch, c.train.dtype)
        self.forward_backward = get_forward_backward_func()
        if c.model.fused_logprobs:
            require_output_processor_hook()
        self.sft = c.train.stage == "sft"
        self.packed_format = default_packed_format(uses_transformer_engine(self.gpu))
        self.reference_step = ReferenceForwardStep(
            fused=c.model.fused_logprobs, packed_format=self.packed_format,
            ld_alpha=None if self.sft else c.loss.ld_alpha)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.metrics_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.is_logging_rank = dist.get_rank() == dist.get_world_size() - 1
        if self.is_logging_rank:
            print(f"packing: {self._packing_report()}", flush=True)

    def _load_data(self):
        """Rank 0 reads and tokenises (writing the cache) first; the others then read the
        cache. A bad row raises the same error on every rank instead of a hang."""
        c = self.config

        def load():
            return load_preference_data(c.data_source(), self.tokenizer, c.data.settings(),
                                        cache=c.data.cache)

        error = [None]
        if dist.get_rank() == 0:
            try:
                result = load()
            except (ValueError, FileNotFoundError) as err:
                error = [err]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]
        if dist.get_rank() != 0:
            result = load()
        if dist.get_rank() == dist.get_world_size() - 1:
            print(f"data: {c.data_source()}: {result[1]}", flush=True)
        return result

    def _build(self, frozen: bool) -> List[torch.nn.Module]:
        """This rank's model chunks: DDP-wrapped for the policy, frozen for a reference."""
        c = self.config
        # pipeline stages exchange shapes first: micro-batches differ in length (longest,
        # pack) or in rows (an evaluation's, or a reference pass's, last one), in every mode
        config = transformer_config(c.model, c.parallel, dtype=self.dtype, gpu=self.gpu,
                                    variable_seq_lengths=True)
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
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=c.optimizer.distributed(self.gpu),
        )
        return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                        disable_bucketing=i > 0)
                for i, chunk in enumerate(chunks)]

    def build_reference(self) -> List[torch.nn.Module]:
        """This rank's frozen reference chunks, with the reference's weights.

        Those of reference.load or model.load when set; otherwise the policy's initial
        weights: copied from the policy when it is built (whatever the device's
        initialisation order), else the initialisation itself (precompute, which builds the
        reference alone, right after seeding, as setup() builds the policy).
        """
        chunks = self._build(frozen=True)
        path = reference_weights_path(self.config)
        if path:
            load_model_weights(chunks, path)
        elif self.model:  # the policy's base (the policy itself unless it has adapters)
            for reference, policy in zip(chunks, self.model, strict=True):
                reference.load_state_dict({k: v for k, v in policy.module.state_dict().items()
                                           if not is_adapter_name(k)})
        elif self.config.model.hf:
            self._import_hf(chunks)
        return chunks

    def _import_hf(self, chunks) -> None:
        """model.hf's weights, imported once into output_dir/hf_import and cached there."""
        from adadpo_megatron.training.hf_checkpoints import IMPORT_DIR, import_into

        c = self.config
        import_into(chunks, c.resolve(c.model.hf), Path(c.train.output_dir) / IMPORT_DIR,
                    fingerprint={"weights": self.sources["model.hf"]})

    def run_schedule(self, step_func, model, batches, forward_only: bool):
        """megatron-core's forward-backward over ``batches``; the last stage's reports.

        Micro-batches may differ in shape: pipeline stages exchange shapes first
        (variable_seq_lengths). The interleaved schedule needs their count to be a multiple
        of the pipeline size (the planner's micro_batch_multiple).
        """
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

    def plan(self, dataset, indices, mode: Optional[str] = None, fill: bool = False):
        """Every data-parallel rank's micro-batches for the pairs ``indices`` of ``dataset``
        (``plan_micro_batches``)."""
        return plan_micro_batches(self.config, dataset.lengths, indices, dp_size=self.dp_size,
                                  thd=self.packed_format == "thd", mode=mode, fill=fill)

    def materialize(self, dataset, plan):
        """This rank's micro-batches of ``plan`` (precomputed reference sums attached)."""
        batches = [materialize(dataset, mb, pad_id=self.tokenizer.pad_id, chosen_only=self.sft)
                   for mb in plan[self.dp_rank]]
        if self.reference_logps is not None:
            attach_precomputed(batches, self.reference_logps)
        return batches

    def step_plan(self, step: int, mode: Optional[str] = None):
        """Every data-parallel rank's micro-batches of training step ``step``."""
        t = self.config.train
        indices = global_batch_indices(step, len(self.train_set), t.global_batch_size, t.seed)
        return self.plan(self.train_set, indices, mode)

    def micro_batches(self, step: int):
        """This rank's micro-batches for ``step`` and the step's real-token share."""
        plan = self.step_plan(step)
        real, computed = step_token_counts(plan)
        return self.materialize(self.train_set, plan), real / computed

    def real_token_fraction(self, steps: range, mode: Optional[str] = None) -> float:
        """Real tokens per computed token over the training steps ``steps``, all ranks."""
        counts = [step_token_counts(self.step_plan(step, mode)) for step in steps]
        return sum(r for r, _ in counts) / sum(c for _, c in counts)

    def _packing_report(self) -> str:
        """The real-token share of each packing mode on the first steps of the loaded data."""
        steps = range(min(self.config.train.max_steps, 8))
        text = ", ".join(f"{mode} {self.real_token_fraction(steps, mode):.2f}"
                         for mode in PACKING_MODES)
        return (f"real tokens per computed token over the first {len(steps)} steps: {text} "
                f"(data.packing={self.config.data.packing})")

    def close(self) -> None:
        from megatron.core import parallel_state

        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
