"""The Megatron hook-in: forward_step and loss_func for megatron-core's pipeline schedules.

``PreferenceForwardStep(loss_config)`` is a ``forward_step_func`` that
``megatron.core.pipeline_parallel.get_forward_backward_func()`` (and Megatron-LM's
``pretrain()``) accept. Each micro-batch holds whole pairs, chosen sequences first (the layout:
``adadpo_megatron.micro_batch``). On the last pipeline stage its loss function turns the
vocab-parallel logits into per-token log-probs, reduces them to whole sequences over context
parallelism, and forms the preference loss, returned in megatron-core's
``(loss sum, pair count, report)`` form. With ``calculate_per_token_loss=True`` megatron
divides the gradient by the pair count summed over micro-batches and data- and
context-parallel ranks, so the gradient is that of the mean loss over all pairs of the
global batch for any micro-batch size, micro-batch count or parallel layout.

``ReferenceForwardStep()`` runs the same model call and the same log-prob code on the frozen
reference (forward-only) and reports per-sequence sums: policy and reference share one path.

Reports are ``{name: tensor([sum over pairs, pairs])}``, the form Megatron-LM's training loop
sums over micro-batches and data-parallel ranks and divides; ``adadpo/coef_max`` is
``[max, 1]`` and ``reduce_reports`` takes its maximum instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from adadpo_megatron.mcore.packed_attention import (
    PACKED_FORMATS,
    block_diagonal_causal_mask,
    packed_model_inputs,
    thd_flatten,
    thd_this_cp_rank,
)
from adadpo_megatron.mcore.parallel_groups import default_group
from adadpo_megatron.micro_batch import SEQUENCE_KEYS, MicroBatch, check_micro_batch
from adadpo_megatron.ops.batch_statistics import RewardRunningMean
from adadpo_megatron.ops.fused_logprobs import fused_hidden_logprobs
from adadpo_megatron.ops.logprobs import (
    group_size,
    sequence_sums,
    shared_length_tail_mask,
    vocab_parallel_log_sum_sq_probs,
    vocab_parallel_logprobs,
)
from adadpo_megatron.ops.loss import LengthTails, preference_loss
from adadpo_megatron.ops.loss_config import LossConfig

MAX_REDUCED = ("adadpo/coef_max",)
COUNTS = ("pairs", "tokens", "adadpo/grad_ratio_pairs")
# metric -> the count metric its mean is weighted by (default: the pairs)
WEIGHTED_BY = {"adadpo/grad_ratio": "adadpo/grad_ratio_pairs"}


def _groups(tp_group, cp_group):
    return default_group(tp_group, "tp"), default_group(cp_group, "cp")


def _data_parallel_group(dp_group):
    """``dp_group``, else megatron-core's data-parallel group without context parallelism
    (CP ranks hold the same pairs), else None."""
    if dp_group is not None or not (dist.is_available() and dist.is_initialized()):
        return dp_group
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=False)


def _this_cp_rank(batch: MicroBatch, cp_group) -> MicroBatch:
    """The batch with its sequence dimension cut to this CP rank's load-balanced chunks:
    megatron-core's per-sequence split for rows (an ``attention_mask`` [R, 1, S, S] by its
    query rows, as megatron-core splits it), per segment for a THD-packed batch."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return batch
    if "cu_seqlens" in batch:
        return thd_this_cp_rank(batch, cp_group)
    from megatron.core.utils import get_batch_on_this_cp_rank

    keys = SEQUENCE_KEYS + ("attention_mask",)
    sharded = get_batch_on_this_cp_rank({k: batch[k] for k in keys if k in batch},
                                        is_hybrid_cp=False, cp_group=cp_group)
    return {**batch, **sharded}


def _model_forward(model, batch: Optional[MicroBatch]):
    """The policy's and the reference's forward: logits [rows, s, V/TP] on the last stage."""
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    # attention_mask None: the causal mask of the layer spec (rows); packed: see
    # adadpo_megatron.mcore.packed_attention
    return model(tokens, positions, **packed_model_inputs(batch))


def _fused_model_forward(model, batch: Optional[MicroBatch]):
    """The forward with the fused log-prob path: per-token log-probs [2m, s] on the last
    stage, the logits never materialised (adadpo_megatron.ops.fused_logprobs)."""
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    return model(tokens, positions, output_processor=LogProbOutputProcessor(),
                 output_processor_context=batch["labels"] if batch is not None else None,
                 **packed_model_inputs(batch))


def require_output_processor_hook() -> None:
    """Raises a clear error where GPTModel has no output_processor hook."""
    from megatron.core import __version__ as megatron_version
    from megatron.core.models.gpt import GPTModel

    if "output_processor" not in inspect.signature(GPTModel.forward).parameters:
        raise RuntimeError(
            f"model.fused_logprobs=true needs GPTModel's output_processor hook, which "
            f"megatron-core {megatron_version} does not have; use a release that does "
            "(0.19 has it) or set model.fused_logprobs=false")


class LogProbOutputProcessor:
    """GPTModel output_processor: per-token log-probs [b, s] instead of logits.

    The labels [b, s] travel as ``output_processor_context``. Sequence parallel hidden states
    are gathered with megatron-core's own region function (reduce-scatter in backward);
    without it the hidden states enter the TP region by megatron's copy (all-reduce in
    backward), as ColumnParallelLinear does.
    """

    def __init__(self, tp_group=None, chunk_size: Optional[int] = None):
        self.tp_group, self.chunk_size = tp_group, chunk_size

    def __call__(self, *, hidden_states, output_layer, output_weight, context, **_):
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        tp_group = default_group(self.tp_group, "tp")
        weight = output_weight if output_weight is not None else output_layer.weight
        if getattr(output_layer, "sequence_parallel", False):
            hidden = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
        elif group_size(tp_group) > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        else:
            hidden = hidden_states
        labels = context  # [b, s]; the hidden states are [s, b, h]
        s, b = hidden.shape[0], hidden.shape[1]
        logps = fused_hidden_logprobs(hidden.reshape(s * b, -1), weight,
                                      labels.t().reshape(-1), tp_group=tp_group,
                                      chunk_size=self.chunk_size)
        return logps.view(s, b).t()


@dataclass(frozen=True)
class SequenceStatistics:
    """Per-sequence statistics of a micro-batch, [2m] each (chosen first; [m] for SFT),
    reduced over tensor- and context-parallel ranks.

    Fields:
        logps: sums of response-token log-probs (differentiable).
        lengths: response-token counts (detached).
        tail_logps, tail_lengths: LD-DPO's sums and counts beyond the shorter response of
            the pair, where the batch has an ``ld_tail_mask``.
        wpo_logps: WPO's detached sum of log p - log sum_v p_v^2, where asked for.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    tail_logps: Optional[torch.Tensor] = None
    tail_lengths: Optional[torch.Tensor] = None
    wpo_logps: Optional[torch.Tensor] = None

    def ld_weighted(self, ld_alpha: Optional[float]) -> torch.Tensor:
        """LD-DPO's sums: shared + alpha * tail (the plain sums without ld_alpha)."""
        if ld_alpha is None:
            return self.logps
        return self.logps - (1.0 - ld_alpha) * self.tail_logps


def _sequence_statistics(output_tensor, batch: MicroBatch, tp_group, cp_group,
                         fused: bool = False, sides: int = 2,
                         wpo: bool = False) -> SequenceStatistics:
    """The SequenceStatistics of the last stage's output (logits, or log-probs when fused),
    in one CP all-reduce; tails with an ``ld_tail_mask`` in the batch, WPO's sums with
    ``wpo``. A packed batch is reduced per segment: ``sides`` segments per pair, chosen
    first."""
    if fused:
        token_logps = output_tensor
    else:
        token_logps = vocab_parallel_logprobs(output_tensor, batch["labels"], tp_group=tp_group)
    mask = batch["loss_mask"].to(torch.float32)
    channels = {"logps": token_logps * mask, "lengths": mask}
    if "ld_tail_mask" in batch:
        tail = batch["ld_tail_mask"].to(torch.float32)
        channels.update(tail_logps=token_logps * tail, tail_lengths=tail)
    if wpo:
        log_sum_sq = vocab_parallel_log_sum_sq_probs(output_tensor, tp_group=tp_group)
        channels["wpo_logps"] = (token_logps.detach() - log_sum_sq) * mask
    segments = {}
    if "segment_ids" in batch:
        segments = {"segment_ids": batch["segment_ids"],
                    "num_segments": sides * batch["example_ids"].numel()}
    sums = sequence_sums(torch.stack(list(channels.values())), cp_group=cp_group, **segments)
    out = dict(zip(channels, sums, strict=True))
    for name in ("lengths", "tail_lengths", "wpo_logps"):
        if name in out:
            out[name] = out[name].detach()
    return SequenceStatistics(**out)


def pairs_first_to_chosen_first(batch: MicroBatch) -> MicroBatch:
    """A pair-major batch (tokens [m, 2, S], ref_logps [m, 2], as a loader that stacks
    PairDataset items makes it) in the chosen-first layout ([2m, S], [2m]); a chosen-first
    batch is returned as it is."""
    if batch["tokens"].dim() == 2:
        return batch
    out = dict(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "ref_logps"):
        if key in batch:
            value = batch[key]
            out[key] = value.transpose(0, 1).reshape(-1, *value.shape[2:])
    return out


def _next_batch(data_iterator) -> Optional[MicroBatch]:
    # Megatron-LM passes None on pipeline stages that read no data.
    if data_iterator is None:
        return None
    batch = next(data_iterator)
    check_micro_batch(batch)  # (either layout: the keys and shapes agree in both)
    return pairs_first_to_chosen_first(batch)


def _to_device(batch: Optional[MicroBatch], device: torch.device) -> Optional[MicroBatch]:
    if batch is None:
        return None
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


ModelForward = Callable[[torch.nn.Module, Optional[MicroBatch]], torch.Tensor]


class _ForwardStep:
    """What the policy's and the reference's forward steps share: one code path."""

    sides = 2  # sequences per pair in a micro-batch: chosen and rejected

    def __init__(self, *, tp_group=None, cp_group=None,
                 model_forward: Optional[ModelForward] = None, fused: bool = False,
                 packed_format: Optional[str] = None, ld_alpha: Optional[float] = None):
        if packed_format is not None and packed_format not in PACKED_FORMATS:
            raise ValueError(f"packed_format={packed_format!r}; choose one of "
                             f"{', '.join(PACKED_FORMATS)}")
        self.tp_group, self.cp_group = tp_group, cp_group
        self.fused = fused
        self.packed_format = packed_format
        self.ld_alpha = ld_alpha
        if model_forward is None:
            model_forward = _fused_model_forward if fused else _model_forward
        self.model_forward = model_forward
        self.finite_checks: List[tuple] = []

    def schedule_shape(self, batch: MicroBatch) -> Tuple[int, int]:
        """(micro_batch_size, seq_length) to give megatron-core's schedule for ``batch``:
        its rows and row length, or (1, all tokens) for a THD-packed batch."""
        rows, length = batch["tokens"].shape
        if "segment_ids" in batch and self.packed_format == "thd":
            return 1, rows * length
        return rows, length

    def start_step(self) -> None:
        """Forgets the previous step's finiteness checks (call before each step)."""
        self.finite_checks = []

    def nonfinite_micro_batches(self) -> List[tuple]:
        """[(micro-batch index, example ids)] of this step whose loss was not finite.

        The checks are recorded as device tensors in the loss function and read here, after
        the schedule, with one transfer: the hot path never waits for the device.
        """
        if not self.finite_checks:
            return []
        finite = torch.stack([ok for ok, _ in self.finite_checks]).cpu()
        return [(i, ids.tolist() if ids is not None else [])
                for i, (_, ids) in enumerate(self.finite_checks) if not finite[i]]

    def _record_finite(self, losses: torch.Tensor, batch: MicroBatch) -> None:
        self.finite_checks.append((torch.isfinite(losses).all(), batch.get("example_ids")))

    def __call__(self, data_iterator, model):
        tp_group, cp_group = _groups(self.tp_group, self.cp_group)
        batch = _next_batch(data_iterator)
        if batch is not None and "segment_ids" in batch:
            if self.packed_format is None:
                # a wrong guess would let segments attend to each other, silently
                raise ValueError("a packed micro-batch (with segment_ids) needs the forward "
                                 "step's packed_format: 'thd' for Transformer Engine layers, "
                                 "'mask' for megatron-core's local layers")
        if batch is not None and self.ld_alpha is not None:
            # on the whole micro-batch, before the CP split: positions are per sequence
            batch = {**batch, "ld_tail_mask": shared_length_tail_mask(
                batch["loss_mask"], batch["example_ids"].numel(), batch.get("segment_ids"))}
        if batch is not None and "segment_ids" in batch and self.packed_format == "thd":
            batch = thd_flatten(batch)  # on the CPU, before the copy: no device sync
        batch = _to_device(batch, _device_of(model))
        if batch is not None and "segment_ids" in batch and self.packed_format == "mask":
            # of the whole rows, before the CP split cuts their queries (keys stay whole)
            batch = {**batch, "attention_mask": block_diagonal_causal_mask(batch["segment_ids"])}
        if batch is not None:
            batch = _this_cp_rank(batch, cp_group)
        output = self.model_forward(model, batch)
        return output, partial(self.loss_func, batch, tp_group, cp_group)


class PreferenceForwardStep(_ForwardStep):
    """forward_step(data_iterator, model) for the policy.

    Args:
        loss_config: the preference loss.
        tp_group, cp_group: process groups; None falls back to megatron-core's parallel_state.
        dp_group: the data-parallel group (without CP) that aot and aot_unpaired sort their
            batch over; None falls back to megatron-core's. Unused by the other losses.
        model_forward: ``(model, batch) -> output``; the default calls
            ``model(tokens, position_ids, None)`` as GPTModel takes it. Any model whose last
            stage returns vocab-parallel logits [2m, s, V/TP] works.
        fused: compute the log-probs inside GPTModel's output_processor hook, from the
            hidden states, without materialising the logits (the last stage's output is then
            log-probs [2m, s]). Not with ``loss_config.use_weighting`` (WPO reads the logits).
        packed_format: how attention sees the segments of a packed micro-batch (one with
            ``segment_ids``, see adadpo_megatron.data.packing): "mask" (an explicit
            block-diagonal mask; megatron-core's local layers, CPU) or "thd" (PackedSeqParams;
            Transformer Engine layers); required for packed micro-batches, which are refused
            without it. Row micro-batches ignore it.
    The batch's ``ref_logps`` [2m] (precomputed or filled in by the resident reference) is
    required by losses that need a reference. bco_pair's running reward mean lives here:
    call ``finish_step`` after each optimizer step, and save ``state_dict``.
    """

    def __init__(self, loss_config: LossConfig, *, tp_group=None, cp_group=None,
                 dp_group=None, model_forward: Optional[ModelForward] = None,
                 fused: bool = False, packed_format: Optional[str] = None):
        super().__init__(tp_group=tp_group, cp_group=cp_group, model_forward=model_forward,
                         fused=fused, packed_format=packed_format,
                         ld_alpha=loss_config.ld_alpha)
        loss_config.check_fused_logprobs(fused)
        self.loss_config = loss_config
        self.dp_group = dp_group
        self.running_mean = RewardRunningMean()

    def start_step(self) -> None:
        super().start_step()
        self.running_mean.discard()

    def finish_step(self, *, replicas: int = 1, device=None) -> None:
        """After an optimizer step, on every rank: folds the step's bco_pair rewards into the
        running mean (one all-reduce over all ranks; nothing without bco_pair).
        ``replicas``: tensor- times context-parallel size, the ranks that compute each pair's
        loss."""
        if self.loss_config.updates_running_mean:
            self.running_mean.commit(replicas=replicas, device=device)

    def state_dict(self) -> Dict[str, Dict[str, float]]:
        return {"bco_running_mean": self.running_mean.state_dict()}

    def load_state_dict(self, state: Dict[str, Dict[str, float]]) -> None:
        if "bco_running_mean" in state:
            self.running_mean.load_state_dict(state["bco_running_mean"])

    def loss_func(self, batch: MicroBatch, tp_group, cp_group, output_tensor):
        c = self.loss_config
        stats = _sequence_statistics(output_tensor, batch, tp_group, cp_group, self.fused,
                                     self.sides, wpo=c.use_weighting)
        sums, counts = stats.logps, stats.lengths
        pairs = sums.shape[0] // 2
        reference = ()
        if c.needs_reference:
            if "ref_logps" not in batch:
                raise ValueError(f"loss_type={c.loss_type!r} needs reference "
                                 "log-probs, but the micro-batch has no 'ref_logps'")
            ref = batch["ref_logps"].to(sums.dtype)
            reference = (ref[:pairs], ref[pairs:])
        extra = {}
        if c.ld_alpha is not None:
            tail, tail_n = stats.tail_logps, stats.tail_lengths
            extra["tails"] = LengthTails(tail[:pairs], tail[pairs:], tail_n[:pairs],
                                         tail_n[pairs:])
        if c.use_weighting:
            weights = torch.exp(stats.wpo_logps / counts.clamp(min=1))
            extra["wpo_weights"] = (weights[:pairs], weights[pairs:])
        if c.sorts_batch:
            extra["batch_group"] = _data_parallel_group(self.dp_group)
        losses, metrics = preference_loss(sums[:pairs], sums[pairs:], counts[:pairs],
                                          counts[pairs:], *reference, config=c,
                                          running_mean=self.running_mean, **extra)
        if batch.get("filler"):
            return _counting_nothing(losses.sum(), _report(metrics, pairs))
        self._record_finite(losses, batch)
        count = torch.tensor(pairs, dtype=torch.int, device=sums.device)
        return losses.sum(), count, _report(metrics, pairs)


class SFTForwardStep(_ForwardStep):
    """forward_step(data_iterator, model) for supervised warm-up on the chosen responses.

    Micro-batches hold the chosen rows only (``collate(..., chosen_only=True)``). The loss is
    the summed NLL of the response tokens with the token count, so megatron's per-token
    normalisation gives the mean NLL per response token over the global batch.
    """

    sides = 1

    def loss_func(self, batch: MicroBatch, tp_group, cp_group, output_tensor):
        stats = _sequence_statistics(output_tensor, batch, tp_group, cp_group, self.fused,
                                     self.sides)
        sums, counts = stats.logps, stats.lengths
        nll = -sums.sum()
        tokens = counts.sum()
        report = {"loss": torch.stack([nll.detach(), tokens]),
                  "nll/chosen": torch.stack([nll.detach(), tokens]),
                  "tokens": torch.stack([tokens, torch.ones_like(tokens)]),
                  "pairs": torch.stack([torch.tensor(float(sums.shape[0])),
                                        torch.tensor(1.0)]).to(tokens)}
        if batch.get("filler"):
            return _counting_nothing(nll, report)
        self._record_finite(nll, batch)
        return nll, tokens.round().int(), report


class ReferenceForwardStep(_ForwardStep):
    """forward_step(data_iterator, model) for the frozen reference, run forward-only.

    Same arguments as PreferenceForwardStep but the loss, plus ``ld_alpha`` (the loss's
    LD-DPO weight: the sums are then shared + ld_alpha * tail). Its report holds
    ``ref_logps`` [2m], the per-sequence sums, and ``ref_counts``.
    """

    def loss_func(self, batch, tp_group, cp_group, output_tensor):
        with torch.no_grad():
            stats = _sequence_statistics(output_tensor, batch, tp_group, cp_group, self.fused,
                                         self.sides)
        sums = stats.ld_weighted(self.ld_alpha)
        zero = output_tensor.new_zeros(())
        count = torch.tensor(sums.shape[0] // 2, dtype=torch.int, device=sums.device)
        return zero, count, {"ref_logps": sums, "ref_counts": stats.lengths}


def _counting_nothing(loss: torch.Tensor, report: Dict[str, torch.Tensor]):
    """loss_func's return for a filler micro-batch (a copy that pads an evaluation to the
    schedule's micro-batch count, adadpo_megatron.data.packing): no loss, no pairs, a report
    of zeros that adds nothing to any sum, mean or maximum (maxima are of non-negative
    values)."""
    count = torch.zeros((), dtype=torch.int, device=loss.device)
    return loss * 0.0, count, {name: torch.zeros_like(value) for name, value in report.items()}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _report(metrics: Dict[str, torch.Tensor], pairs: int) -> Dict[str, torch.Tensor]:
    report = {}
    for name, value in metrics.items():
        value = value.detach().float()
        if name in MAX_REDUCED or name in COUNTS:  # reduced by max, or summed as they are
            report[name] = torch.stack([value, torch.ones_like(value)])
        elif name in WEIGHTED_BY:
            weight = metrics[WEIGHTED_BY[name]].detach().float()
            report[name] = torch.stack([value * weight, weight])
        else:
            report[name] = torch.stack([value * pairs, torch.full_like(value, pairs)])
    return report


def reduce_reports(reports: Iterable[Dict[str, torch.Tensor]], group=None,
                   context_parallel_size: int = 1) -> Dict[str, float]:
    """Metrics of one step: micro-batch reports reduced over micro-batches and ``group``.

    Means are weighted by pairs (``adadpo/grad_ratio`` by the pairs it is defined on, and
    left out where there are none); ``adadpo/coef_max`` is a maximum; the COUNTS are totals
    (summed over data-parallel ranks, counted once over the ``context_parallel_size`` ranks
    that each report the same pairs). Call on the last pipeline stage with the
    data-and-context-parallel group.
    """
    reports = list(reports)
    if not reports:
        return {}
    names = sorted(reports[0])
    summed = torch.stack([torch.stack([r[n] for n in names]) for r in reports]).sum(0)
    maxed = torch.stack([torch.stack([r[n][0] for n in names]) for r in reports]).amax(0)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(summed, group=group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    out = {}
    for i, name in enumerate(names):
        if name in MAX_REDUCED:
            out[name] = maxed[i].item()
        elif name in COUNTS:
            out[name] = summed[i, 0].item() / context_parallel_size
        elif summed[i, 1] > 0:
            out[name] = (summed[i, 0] / summed[i, 1]).item()
    return out


def collect_reference(reports: List[Dict[str, torch.Tensor]], batches: List[MicroBatch]) -> None:
    """Attaches the resident reference's per-micro-batch sums to the policy's batches."""
    for report, batch in zip(reports, batches, strict=True):
        batch["ref_logps"] = report["ref_logps"].detach()
