"""The training loop: megatron-core's optimizer and LR schedule around the step, on a
RunContext (adadpo_megatron.training.run: the parallel world, data and model building).

    trainer = Trainer(load_run_config("configs/tiny_cpu.yaml"))
    trainer.setup()          # distributed, process groups, data, model(s), optimizer
    trainer.train()          # max_steps steps, one JSON line per step in metrics.jsonl
    trainer.close()

Launch under torchrun for more than one process; see adadpo_megatron.training.cli.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer

from adadpo_megatron.data.packing import step_token_counts
from adadpo_megatron.mcore.forward_step import (
    PreferenceForwardStep,
    SFTForwardStep,
    collect_reference,
    reduce_reports,
)
from adadpo_megatron.mcore.lora import adapters_disabled
from adadpo_megatron.training.checkpointing.checkpoint import (
    LATEST,
    STATE_FILE,
    CheckpointState,
    check_resume_config,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    pointer_target,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from adadpo_megatron.training.checkpointing.resume_checks import (
    depends_on_initial_weights,
    yaml_view,
)
from adadpo_megatron.training.preemption import StopRequests
from adadpo_megatron.training.process_groups import computed_on_rank_zero
from adadpo_megatron.training.reference_cache import (
    default_cache_path,
    eval_cache_path,
    load_cache,
    reference_fingerprint,
)
from adadpo_megatron.training.reporting.run_log import RunLog
from adadpo_megatron.training.run import RunContext, setup_run
from adadpo_megatron.training.run_config import OptimizerSection, RunConfig, to_dict


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
    """The policy, its optimizer and the loop, on a RunContext (the parallel world, the data,
    model building and the schedule call: adadpo_megatron.training.run), which it holds.

    Every attribute is declared here; ``setup()`` fills them in.
    """

    def __init__(self, config: RunConfig, stop: Optional[StopRequests] = None):
        """``stop``: the stop requests a command already installed (adadpo-train does, before
        its imports), else new ones: until the first step a signal stops the process at once
        (Preempted), then after the step it arrives in; train.exit_after_minutes from now."""
        self.config = config
        self.stop = stop if stop is not None else StopRequests()
        self.stop.immediate = True
        self.stop.start_budget(config.train.exit_after_minutes)
        self.stop.install()
        self.stop_agreed = False  # some rank asked to stop: every rank stops after this step
        self.stopped: Optional[str] = None  # why train() returned early, if it did
        self.run: Optional[RunContext] = None
        self.model: List[torch.nn.Module] = []  # the policy's chunks, DDP-wrapped
        self.reference_model: List[torch.nn.Module] = []  # reference.mode resident
        self.reference_logps: Optional[torch.Tensor] = None  # reference.mode precompute
        self.eval_reference_logps: Optional[torch.Tensor] = None  # the evaluation pairs'
        self.optimizer = None
        self.scheduler = None
        self.forward_step: Optional[PreferenceForwardStep | SFTForwardStep] = None
        self.reference_step = None
        self.start_step = 0

    @property
    def is_logging_rank(self) -> bool:
        return self.run is not None and self.run.groups.is_logging_rank

    # ------------------------------------------------------------------ set-up

    def setup(self) -> Trainer:
        """Everything for training: the run, the models, the optimizer, the resumed state."""
        c = self.config
        self.run = run = setup_run(c, claim_output_dir=True)
        data = run.data
        # before anything is built, so that a refused change fails fast; on rank 0, which
        # reads the checkpoint's state once and tells every rank
        resume, meta, changes = computed_on_rank_zero(self._check_resume)
        if c.reference.mode == "precompute":  # before building anything: a stale cache fails
            self.reference_logps = load_cache(
                default_cache_path(c),
                reference_fingerprint(c, data.tokenizer, data.dataset, data.sources),
                data.dataset)
            self.eval_reference_logps = self.reference_logps
            if c.data.eval_path is not None:  # data.eval_path's own cache
                self.eval_reference_logps = load_cache(
                    eval_cache_path(c),
                    reference_fingerprint(c, data.tokenizer, data.eval_set, data.sources),
                    data.eval_set)
        self.model = run.build_model(frozen=False)
        if resume is None or depends_on_initial_weights(yaml_view(to_dict(c))):
            # (a resumed full-model run takes every weight from its checkpoint: reading
            # model.load or model.hf, 140 GB at 70B, would be thrown away)
            run.load_initial_weights(self.model)
        if c.reference.mode == "resident":
            self.reference_model = run.build_reference(policy=self.model)
        self._build_optimizer()
        g, fused, packed = run.groups, c.model.fused_logprobs, run.packed_format
        self.forward_step = (
            SFTForwardStep(tp_group=g.tp, cp_group=g.cp, fused=fused, packed_format=packed)
            if run.sft else
            PreferenceForwardStep(c.loss, tp_group=g.tp, cp_group=g.cp, dp_group=g.dp,
                                  fused=fused, packed_format=packed))
        self.reference_step = run.reference_step()
        if resume is not None:
            self.start_step = load_checkpoint(self.checkpoint_state(), resume, meta)
            if self.is_logging_rank:
                print(f"resumed from {resume} at step {self.start_step}", flush=True)
                schedule = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes
                            if k in OptimizerSection.SCHEDULE_KEYS]
                if schedule:
                    print(f"learning-rate schedule: this run's ({'; '.join(schedule)}), as a "
                          f"fresh run of this config has it from step {self.start_step} on: "
                          f"lr {self.optimizer.param_groups[0]['lr']:.6g} now", flush=True)
        return self

    def checkpoint_state(self) -> CheckpointState:
        """What checkpoints save of this trainer, and restore into it."""
        data = self.run.data
        loss_state = self.forward_step if hasattr(self.forward_step, "state_dict") else None
        return CheckpointState(config=self.config, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, data_content=data.dataset.content_hash,
                               loss_state=loss_state, gpu=self.run.gpu, files=data.sources)

    def _check_resume(self) -> Tuple[Optional[Path], Optional[Dict], List[tuple]]:
        """(the checkpoint to resume, its state file, the config changes accepted) or
        (None, None, []); raises for a refused change (check_resume_config)."""
        path = self._resume_path()
        if path is None:
            return None, None, []
        meta = read_state(path)
        data = self.run.data
        return path, meta, check_resume_config(
            self.config, data.dataset.content_hash, meta, report=True, files=data.sources,
            data_parallel_size=self.run.layout.dp)

    def _resume_path(self) -> Optional[Path]:
        """The checkpoint train.resume names: auto, this run's latest (or newest verified);
        a path, the checkpoint it means (a checkpoint, a run directory, its checkpoints/, a
        Megatron-LM root), as model.load reads them."""
        t = self.config.train
        if t.resume == "never":
            return None
        root = checkpoint_root(t.output_dir)
        if t.resume == "auto":
            path = latest_checkpoint(t.output_dir)
            if path is not None and not pointer_target(root):
                print(f"{root / LATEST} is missing or empty: resuming from the newest "
                      f"complete checkpoint, {path.name} (verified)", flush=True)
            return path
        path = resolve_checkpoint(t.resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"train.resume={t.resume!r} is not a checkpoint of this project (no "
                f"{STATE_FILE} in {path}); a checkpoint may have been pruned since: "
                "train.resume=auto continues a run from its latest")
        newest = pointer_target(root)
        if newest and path.parent.resolve() == root.resolve() and newest != path.name:
            print(f"adadpo-train: warning: train.resume names {path.name}, but this run's "
                  f"latest checkpoint is {newest}: continuing from the older one rewrites the "
                  "steps after it (train.resume=auto continues from the latest)",
                  file=sys.stderr, flush=True)
        return path

    def _build_optimizer(self) -> None:
        c = self.config
        self.optimizer = get_megatron_optimizer(
            c.optimizer.optimizer_config(gpu=self.run.gpu, dtype=self.run.dtype), self.model)
        self.scheduler = c.optimizer.scheduler(self.optimizer, c.train.max_steps)
        model_config = self.model[0].config
        model_config.finalize_model_grads_func = finalize_model_grads
        model_config.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ the step

    def micro_batches(self, step: int):
        """This rank's micro-batches for ``step`` and the step's real-token share."""
        plan = self.run.step_plan(step)
        real, computed = step_token_counts(plan)
        batches = self.run.materialize(self.run.data.train_set, plan, self.reference_logps)
        return batches, real / computed

    def _attach_reference(self, batches) -> None:
        """Fills ``ref_logps`` from the resident reference, or from the policy with its
        adapters off (precomputed ones are already in)."""
        run = self.run
        if self.config.reference.mode == "adapters_off":
            with adapters_disabled(self.model), evaluating(self.model):
                reports = run.forward_only(self.reference_step, self.model, batches)
        elif self.reference_model:
            reports = run.forward_only(self.reference_step, self.reference_model, batches)
        else:
            return
        if run.groups.is_last_stage:
            collect_reference(reports, batches)

    def _metrics(self, reports) -> Dict[str, float]:
        """The reports of this rank's micro-batches reduced over the data- and
        context-parallel ranks (the last pipeline stage's; {} elsewhere)."""
        run = self.run
        if not run.groups.is_last_stage:
            return {}
        return reduce_reports(reports, run.groups.dp_cp, run.layout.cp)

    def evaluate(self) -> Dict[str, float]:
        """The step metrics on the held-out pairs, forward-only, prefixed "eval/"."""
        run, eval_set = self.run, self.run.data.eval_set
        plan = run.plan(eval_set, range(len(eval_set)), fill=True)
        batches = run.materialize(eval_set, plan, self.eval_reference_logps)
        self._attach_reference(batches)
        with evaluating(self.model):
            reports = run.forward_only(self.forward_step, self.model, batches)
        return {f"eval/{name}": value for name, value in self._metrics(reports).items()}

    def train_step(self, step: int) -> Dict[str, float]:
        """One optimizer step; returns the step's metrics (complete on the logging rank)."""
        run = self.run
        start = time.perf_counter()
        batches, real_token_fraction = self.micro_batches(step)
        self._attach_reference(batches)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_step.start_step()
        reports = run.run_schedule(self.forward_step, self.model, batches, forward_only=False)
        self._stop_if_not_finite(step)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if not run.sft:
            self.forward_step.finish_step(replicas=run.layout.replicas, device=self._device())
        metrics: Dict[str, float] = {"step": step, **self._metrics(reports)}
        elapsed = time.perf_counter() - start
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       learning_rate=learning_rate, step_time=elapsed)
        metrics["data/real_token_fraction"] = real_token_fraction
        if "tokens" in metrics:
            metrics["tokens_per_second"] = metrics["tokens"] / elapsed
        return metrics

    def _device(self) -> Optional[torch.device]:
        """The device NCCL's collectives need (None: gloo's CPU tensors)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.run.gpu else None

    def _stop_if_not_finite(self, step: int) -> None:
        """Raises NonFiniteError on every rank, before any weight changes, if a loss or a
        gradient of this step is not finite, naming the step and the micro-batches. The same
        collective carries each rank's request to stop (a signal, the time budget), so that
        every rank agrees to stop after this step."""
        bad_losses = self.forward_step.nonfinite_micro_batches()
        finite_grads = [torch.isfinite(buffer.grad_data).all()
                        for chunk in self.model for buffer in chunk.buffers]
        device = self._device()
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
        if self.start_step >= t.max_steps:
            if self.is_logging_rank:
                what = (f"train.num_epochs={t.num_epochs} (train.max_steps={t.max_steps})"
                        if t.num_epochs is not None else f"train.max_steps={t.max_steps}")
                print(f"this run is finished: {t.output_dir}'s checkpoint is at step "
                      f"{self.start_step}, and {what}. To train on, raise it (the run resumes "
                      "from that step); for a new run, use another train.output_dir or "
                      "train.resume=never train.overwrite=true", file=sys.stderr, flush=True)
            return history
        log = RunLog(self.config, self.start_step) if self.is_logging_rank else None
        self.stop.immediate = False  # from the first step on, a signal stops after a step
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
            if log is not None:
                log.close()
        return history

    def close(self) -> None:
        """Gives the signals back, then the run (its lock, megatron-core's groups)."""
        self.stop.restore()
        if self.run is not None:
            self.run.close()

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


