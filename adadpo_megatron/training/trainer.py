"""The training loop: megatron-core's schedules, DDP, optimizer and LR schedule around the step.

    trainer = Trainer(load_run_config("configs/tiny_cpu.yaml"))
    trainer.setup()          # distributed, parallel_state, data, model(s), optimizer
    trainer.train()          # max_steps steps, one JSON line per step in metrics.jsonl
    trainer.close()

Launch under torchrun for more than one process; see adadpo_megatron.training.cli.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from adadpo_megatron.data.micro_batches import global_batch_indices, split_held_out
from adadpo_megatron.data.packing import PACKING_MODES, materialize, plan_step, step_token_counts
from adadpo_megatron.data.preference_data import load_preference_data
from adadpo_megatron.data.tokenizers import build_tokenizer
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import (
    PreferenceForwardStep,
    ReferenceForwardStep,
    SFTForwardStep,
    collect_reference,
    reduce_reports,
    require_output_processor_hook,
)
from adadpo_megatron.mcore.lora import adapters_disabled, init_adapters_, is_adapter_name
from adadpo_megatron.mcore.model import (
    build_model_chunks,
    canonical_init_,
    model_vocab_size,
    transformer_config,
    uses_transformer_engine,
)
from adadpo_megatron.mcore.packed_attention import default_packed_format
from adadpo_megatron.training.checkpoint import (
    CheckpointState,
    check_resume_config,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from adadpo_megatron.training.preemption import StopRequests
from adadpo_megatron.training.process_groups import init_distributed
from adadpo_megatron.training.reference_cache import (
    attach_precomputed,
    default_cache_path,
    load_cache,
    reference_fingerprint,
    reference_weights_path,
)
from adadpo_megatron.training.run_config import RunConfig
from adadpo_megatron.training.run_dir import (
    RunDirectoryError,
    RunDirectoryLock,
    prepare_fresh_run,
)
from adadpo_megatron.training.run_log import RunLog


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; raised on every rank before the optimizer step."""


class GradNormWatch:
    """Counts consecutive steps whose gradient norm is 0 or not finite (nothing is learned:
    a saturated loss, a blown-up model); says so once when the count reaches ``steps``."""

    def __init__(self, steps: int):
        self.steps, self.count = steps, 0

    def update(self, step: int, norm: float) -> Optional[str]:
        self.count = self.count + 1 if not (math.isfinite(norm) and norm > 0) else 0
        if self.count != self.steps:
            return None
        return (f"the gradient norm was {norm} for {self.count} consecutive steps (to step "
                f"{step}): nothing is learned; check optimizer.lr and the loss's scale")


@contextlib.contextmanager
def evaluating(chunks: List[torch.nn.Module]):
    """The chunks in eval mode (no dropout) inside the block, in train mode after it."""
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk in chunks:
            chunk.train()


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than train.distributed_timeout_minutes for some rank."""


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.stop = StopRequests(config.train.exit_after_minutes)  # the budget starts now
        self.stop_agreed = False  # some rank asked to stop: every rank stops after this step
        self.stopped: Optional[str] = None  # why train() returned early, if it did
        self.gpu = torch.cuda.is_available()
        self.model: List[torch.nn.Module] = []
        self.reference_model: List[torch.nn.Module] = []
        self.reference_logps: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> Trainer:
        """Everything for training: the common part, the models, the optimizer."""
        c = self.config
        self.setup_common(claim_output_dir=True)
        resume = self._resume_path()
        if resume is not None:  # before anything is built: a refused change fails fast
            check_resume_config(c, self.dataset.content_hash, resume,
                                report=self.is_logging_rank)
        if c.reference.mode == "precompute":  # before building anything: a stale cache fails
            self.reference_logps = load_cache(
                default_cache_path(c), reference_fingerprint(c, self.tokenizer, self.dataset),
                self.dataset)
        self.model = self._build(frozen=False)
        if c.model.load:
            load_model_weights(self.model, c.resolve(c.model.load))
        elif c.model.hf:
            self._import_hf(self.model)
        if c.reference.mode == "resident":
            self.reference_model = self.build_reference()
        self._build_optimizer()
        fused, packed = c.model.fused_logprobs, self.packed_format
        self.forward_step = (SFTForwardStep(fused=fused, packed_format=packed) if self.sft
                             else PreferenceForwardStep(c.loss, fused=fused,
                                                        packed_format=packed))
        self.start_step = 0
        if resume is not None:
            self.start_step = load_checkpoint(self.checkpoint_state(), resume)
            if self.is_logging_rank:
                print(f"resumed from {resume} at step {self.start_step}", flush=True)
        return self

    def checkpoint_state(self) -> CheckpointState:
        """What checkpoints save of this trainer, and restore into it."""
        loss_state = self.forward_step if hasattr(self.forward_step, "state_dict") else None
        return CheckpointState(config=self.config, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, data_content=self.dataset.content_hash,
                               loss_state=loss_state, gpu=self.gpu)

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

    def _resume_path(self):
        resume = self.config.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.config.train.output_dir)
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={resume!r} is not a checkpoint directory")
        return path

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
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            # every subgroup megatron-core creates (TP, PP, DP, ...) waits this long too
            distributed_timeout_minutes=timeout,
        )
        torch.manual_seed(c.train.seed)
        if self.gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(c.train.seed)
        self.tokenizer = build_tokenizer(c.tokenizer_spec())
        self.dataset, self.data_report = self._load_data()
        self.train_set, self.eval_set = split_held_out(self.dataset, c.data.eval_fraction,
                                                       c.eval_seed)
        # a pair for each micro-batch of each rank (packed: a multiple of PP of them for VPP)
        needed = self.dp_size * (c.micro_batch_multiple() if c.data.packing == "pack" else 1)
        if self.eval_set is not None and len(self.eval_set) < needed:
            raise ValueError(f"data.eval_fraction={c.data.eval_fraction} holds out "
                             f"{len(self.eval_set)} pairs, fewer than the {needed} micro-batches "
                             f"of one evaluation (data-parallel size {self.dp_size})")
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
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self._use_distributed_optimizer(),
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
        import_into(chunks, c.resolve(c.model.hf), Path(c.train.output_dir) / IMPORT_DIR)

    def _use_distributed_optimizer(self) -> bool:
        return bool(self.config.optimizer.megatron.get("use_distributed_optimizer", self.gpu))

    def _build_optimizer(self) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c, o = self.config, self.config.optimizer
        fields = {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0, "clip_grad": 1.0,
                  **o.megatron}
        fields["use_distributed_optimizer"] = self._use_distributed_optimizer()
        fields.setdefault("min_lr", 0.0)
        fields["bf16"] = self.dtype == torch.bfloat16
        fields["params_dtype"] = self.dtype
        self.optimizer = get_megatron_optimizer(OptimizerConfig(**fields), self.model)
        warmup = int(o.lr_warmup_fraction * c.train.max_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else fields["lr"], max_lr=fields["lr"],
            min_lr=fields["min_lr"], lr_warmup_steps=warmup,
            lr_decay_steps=max(c.train.max_steps, warmup + 1), lr_decay_style=o.lr_decay_style,
            start_wd=fields["weight_decay"], end_wd=fields["weight_decay"],
            wd_incr_steps=c.train.max_steps, wd_incr_style="constant")
        model_config = self.model[0].config
        model_config.finalize_model_grads_func = finalize_model_grads
        model_config.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ the step

    def run_schedule(self, step_func, model, batches, forward_only: bool):
        """megatron-core's forward-backward over ``batches``; the last stage's reports.

        All micro-batches of one call have the same shape (pipeline stages exchange tensors
        of a fixed shape), except with data.packing longest or pack, where the stages
        exchange shapes first (variable_seq_lengths).
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

    def plan(self, dataset, indices, mode: Optional[str] = None):
        """Every data-parallel rank's micro-batches for the pairs ``indices``, laid out as
        ``mode`` (default data.packing) says."""
        c = self.config
        return plan_step(dataset.lengths, indices, mode=mode or c.data.packing,
                         dp_size=self.dp_size,
                         micro_batch_size=c.train.micro_batch_size, seq_length=c.data.seq_length,
                         multiple=c.sequence_multiple(), segment_multiple=c.segment_multiple(),
                         sides=c.sides(), max_tokens=c.micro_batch_tokens(),
                         one_sequence=self.packed_format == "thd",
                         micro_batch_multiple=c.micro_batch_multiple())

    def _materialize(self, dataset, plan):
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
        return self._materialize(self.train_set, plan), real / computed

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

    def _attach_reference(self, batches) -> None:
        """Fills ``ref_logps`` from the resident reference, or from the policy with its
        adapters off (precomputed ones are already in)."""
        if self.config.reference.mode == "adapters_off":
            with adapters_disabled(self.model), evaluating(self.model):
                reports = self._forward_only_by_size(self.reference_step, self.model, batches)
        elif self.reference_model:
            reports = self._forward_only_by_size(self.reference_step, self.reference_model,
                                                 batches)
        else:
            return
        if self.is_last_stage:
            collect_reference(reports, batches)

    def _forward_only_by_size(self, step_func, model, batches):
        """run_schedule over batches of possibly different shapes: one call per run of one
        shape, or one call when pipeline stages exchange shapes (variable_seq_lengths)."""
        reports, start = [], 0
        # without pipeline stages nothing is exchanged, so any shapes share one call
        variable = (model[0].config.variable_seq_lengths
                    or self.config.parallel.pipeline_model_parallel_size == 1)
        while start < len(batches):
            shape = batches[start]["tokens"].shape
            end = start
            while end < len(batches) and (variable or batches[end]["tokens"].shape == shape):
                end += 1
            with torch.no_grad():
                reports += self.run_schedule(step_func, model, batches[start:end],
                                             forward_only=True) or []
            start = end
        return reports

    def evaluate(self) -> Dict[str, float]:
        """The step metrics on the held-out pairs, forward-only, prefixed "eval/"."""
        plan = self.plan(self.eval_set, range(len(self.eval_set)))
        batches = self._materialize(self.eval_set, plan)
        self._attach_reference(batches)
        with evaluating(self.model):
            reports = self._forward_only_by_size(self.forward_step, self.model, batches)
        if not self.is_last_stage:
            return {}
        metrics = reduce_reports(reports, self.metrics_group,
                                 self.config.parallel.context_parallel_size)
        return {f"eval/{name}": value for name, value in metrics.items()}

    def train_step(self, step: int) -> Dict[str, float]:
        """One optimizer step; returns the step's metrics (complete on the logging rank)."""
        start = time.perf_counter()
        batches, real_token_fraction = self.micro_batches(step)
        self._attach_reference(batches)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_step.start_step()
        reports = self.run_schedule(self.forward_step, self.model, batches, forward_only=False)
        self._stop_if_not_finite(step)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if not self.sft:
            p = self.config.parallel
            self.forward_step.finish_step(
                replicas=p.tensor_model_parallel_size * p.context_parallel_size,
                device=torch.device("cuda", torch.cuda.current_device()) if self.gpu else None)
        metrics: Dict[str, float] = {"step": step}
        if self.is_last_stage:
            metrics.update(reduce_reports(reports, self.metrics_group,
                                          self.config.parallel.context_parallel_size))
        elapsed = time.perf_counter() - start
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       learning_rate=learning_rate, step_time=elapsed)
        metrics["data/real_token_fraction"] = real_token_fraction
        if "tokens" in metrics:
            metrics["tokens_per_second"] = metrics["tokens"] / elapsed
        return metrics

    def _stop_if_not_finite(self, step: int) -> None:
        """Raises NonFiniteError on every rank, before any weight changes, if a loss or a
        gradient of this step is not finite, naming the step and the micro-batches. The same
        collective carries each rank's request to stop (a signal, the time budget), so that
        every rank agrees to stop after this step."""
        bad_losses = self.forward_step.nonfinite_micro_batches()
        finite_grads = [torch.isfinite(buffer.grad_data).all()
                        for chunk in self.model for buffer in chunk.buffers]
        device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else None
        flags = torch.stack([torch.tensor(bool(bad_losses), device=device),
                             ~torch.stack(finite_grads).all().to(device),
                             torch.tensor(self.stop.requested(), device=device)]).float()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # one collective, on the device NCCL needs
        if flags[2]:
            self.stop_agreed = True
            if self.stop.reason is None:
                self.stop.reason = "another rank was asked to stop"
        if not flags[:2].any():
            return
        details = [None] * dist.get_world_size()
        dist.all_gather_object(details, bad_losses)
        losses = sorted({(i, tuple(ids)) for rank_details in details for i, ids in rank_details})
        if losses:
            where = "; ".join(f"micro-batch {i} (examples {list(ids)})" for i, ids in losses)
            message = f"step {step}: non-finite loss in {where}"
        else:
            message = f"step {step}: the losses were finite but a gradient is not"
        raise NonFiniteError(f"{message}. Stopped before the optimizer step: the weights are "
                             "those of the previous step; the last checkpoint is intact.")

    def train(self) -> List[Dict[str, float]]:
        """Runs the steps from start_step to train.max_steps; returns their metrics (complete
        on the logging rank). On a stop request (SIGTERM, SIGINT, train.exit_after_minutes)
        every rank finishes the step, saves a checkpoint and returns early, with
        ``self.stopped`` saying why."""
        t = self.config.train
        history = []
        log = RunLog(self.config, self.start_step) if self.is_logging_rank else None
        self.stop.install()
        watch = GradNormWatch(t.grad_norm_warning_steps)
        try:
            for step in range(self.start_step, t.max_steps):
                metrics = self._step_naming_timeouts(step)
                last = step + 1 == t.max_steps
                warning = watch.update(step, metrics.get("grad_norm", float("nan")))
                if warning and self.is_logging_rank:
                    print(f"adadpo-train: warning: {warning}", file=sys.stderr, flush=True)
                if t.eval_interval and (last or (step + 1) % t.eval_interval == 0):
                    metrics.update(self.evaluate())
                history.append(metrics)
                if log is not None:
                    log.write(metrics)
                if last or self.stop_agreed or (t.save_interval
                                                and (step + 1) % t.save_interval == 0):
                    save_checkpoint(self.checkpoint_state(), step + 1,
                                    keep=t.keep_checkpoints)
                if self.stop_agreed and not last:
                    self.stopped = f"{self.stop.reason} after step {step}"
                    break
        finally:
            self.stop.restore()
            if log is not None:
                log.close()
        return history

    def _step_naming_timeouts(self, step: int) -> Dict[str, float]:
        """train_step, with a collective that timed out (a hung or dead rank) reported with
        the step and the timeout that ended it."""
        try:
            return self.train_step(step)
        except RuntimeError as err:
            text = str(err)
            if isinstance(err, NonFiniteError) or not any(
                    word in text.lower() for word in ("timed out", "timeout")):
                raise
            minutes = self.config.train.distributed_timeout_minutes
            raise CollectiveTimeout(
                f"step {step}: a collective waited more than train.distributed_timeout_minutes="
                f"{minutes:g} for another rank (a hung or dead rank; this is rank "
                f"{dist.get_rank()}): {text.splitlines()[0] if text else type(err).__name__}"
            ) from err

    def close(self) -> None:
        from megatron.core import parallel_state

        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
