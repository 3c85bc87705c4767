"""The parallel layout of a run: its sizes, what they require, and its process groups.

One object holds the layout, as torchtitan's ParallelDims does: built from the config's
``parallel`` section and the world size (checked against the batch sizes then, naming every
key and factor), it answers what the layout requires of micro-batches and sequences, and
builds megatron-core's process groups, which it hands out explicitly (``ProcessGroups``).

    layout = ParallelLayout.of(config, world_size)   # ValueError naming the keys
    layout.check_machine(gpu=False)                  # what needs a GPU
    groups = layout.build(timeout_minutes=30)        # megatron-core's parallel_state
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from adadpo_megatron.mcore.model_config import ParallelConfig


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups and its place in the layout (megatron-core's).

    Fields:
        tp, pp, cp: tensor-, pipeline- and context-parallel groups.
        dp: data-parallel group without CP (ranks holding other pairs).
        dp_cp: data-parallel group with CP (what metrics are reduced over).
        dp_rank: this rank's data-parallel index (which pairs it holds).
        is_last_stage: this rank runs the last pipeline stage (where the loss is).
        is_logging_rank: the rank that logs: the last global rank (a last stage).
    """

    tp: Any
    pp: Any
    cp: Any
    dp: Any
    dp_cp: Any
    dp_rank: int
    is_last_stage: bool
    is_logging_rank: bool


@dataclass(frozen=True)
class ParallelLayout:
    """The config's parallel section on a world: data parallelism is what the world leaves.

    Fields:
        parallel: the config's ParallelConfig (TP, PP, VPP, CP, EP sizes and SP).
        dp: data-parallel size: world / (tp * pp * cp).
    """

    parallel: ParallelConfig
    dp: int

    @classmethod
    def of(cls, config: Any, world_size: int) -> ParallelLayout:
        """The layout of ``config`` (a RunConfig, which imports this module) on
        ``world_size`` processes, checked against the world and the batch sizes.

        Raises:
            ValueError: naming the keys and every factor, e.g. "WORLD_SIZE(3) is not
                divisible by parallel.tensor_model_parallel_size(2) * ...".
        """
        p = config.parallel
        tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size)
        if world_size % (tp * pp * cp):
            raise ValueError(f"WORLD_SIZE({world_size}) is not divisible by "
                             f"parallel.tensor_model_parallel_size({tp}) * "
                             f"parallel.pipeline_model_parallel_size({pp}) * "
                             f"parallel.context_parallel_size({cp}) = {tp * pp * cp}")
        layout = cls(parallel=p, dp=world_size // (tp * pp * cp))
        layout._check_batches(config)
        return layout

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    @property
    def vpp(self) -> Optional[int]:
        return self.parallel.virtual_pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.parallel.context_parallel_size

    @property
    def ep(self) -> int:
        return self.parallel.expert_model_parallel_size

    def _check_batches(self, config: Any) -> None:
        t, dp, pp, cp, ep = config.train, self.dp, self.pp, self.cp, self.ep
        if (dp * cp) % ep:
            raise ValueError(f"parallel.expert_model_parallel_size({ep}) does not divide "
                             f"data-parallel size({dp}) * parallel.context_parallel_size({cp}) "
                             f"= {dp * cp}: the experts are split over those ranks")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(f"train.global_batch_size({t.global_batch_size}) is not divisible "
                             f"by train.micro_batch_size({t.micro_batch_size}) * "
                             f"data-parallel size({dp}) = {t.micro_batch_size * dp}")
        if self.micro_batch_multiple == 1:
            return
        vpp = f"parallel.virtual_pipeline_model_parallel_size({self.vpp})"
        if config.data.packing == "pack" and t.global_batch_size % (dp * pp):
            # each rank's micro-batches must be a multiple of PP, each of at least one pair:
            # with that many pairs, one pair a micro-batch always plans, whatever their
            # lengths (fewer could need more micro-batches than there are pairs)
            raise ValueError(f"train.global_batch_size({t.global_batch_size}) is not "
                             f"divisible by data-parallel size({dp}) * parallel.pipeline_"
                             f"model_parallel_size({pp}) = {dp * pp}: with {vpp} each rank "
                             f"needs a multiple of {pp} micro-batches, each of at least one "
                             "pair, and long pairs may need a micro-batch each")
        per_rank = t.global_batch_size // (t.micro_batch_size * dp)
        if config.data.packing != "pack" and per_rank % pp:
            raise ValueError(f"train.global_batch_size({t.global_batch_size}) / "
                             f"(train.micro_batch_size({t.micro_batch_size}) * data-parallel "
                             f"size({dp})) = {per_rank} micro-batches, not a multiple of "
                             f"parallel.pipeline_model_parallel_size({pp}), which {vpp} "
                             "needs")

    @property
    def micro_batch_multiple(self) -> int:
        """What each rank's micro-batch count must be a multiple of: the pipeline size for
        megatron-core's interleaved schedule (its default group of micro-batches per virtual
        stage), else 1."""
        return self.pp if self.vpp else 1

    @property
    def segment_multiple(self) -> int:
        """What every packed segment is padded to: 2 x CP, since megatron-core and Transformer
        Engine split each segment in 2 x CP chunks under context parallelism."""
        return 2 * self.cp if self.cp > 1 else 1

    @property
    def replicas(self) -> int:
        """The ranks that compute each pair's loss (TP x CP): a sum over all ranks counts
        each pair this many times."""
        return self.tp * self.cp

    def sequence_multiple(self, fp8_multiple: int = 1) -> int:
        """What the length of a longest-padded or packed micro-batch is rounded up to: the FP8
        GEMMs' alignment (``fp8_multiple``), sequence parallelism (which splits it over TP) and
        context parallelism (2 x CP) each need a multiple."""
        multiple = math.lcm(self.segment_multiple, fp8_multiple)
        return math.lcm(multiple, self.tp) if self.parallel.sequence_parallel else multiple

    def check_machine(self, *, gpu: bool) -> None:
        """What the layout needs of the machine: SP needs a GPU (Transformer Engine or Apex
        norms). CP runs anywhere: Transformer Engine's attention on a GPU, the local
        context-parallel attention without it."""
        if gpu:
            return
        if self.parallel.sequence_parallel:
            raise ValueError("parallel.sequence_parallel=true needs Transformer Engine or "
                             "Apex norms (megatron-core's torch norm refuses it), so a GPU")

    def build(self, timeout_minutes: float) -> ProcessGroups:
        """megatron-core's process groups for this layout (on an initialised default group),
        each collective of them bounded by ``timeout_minutes``; this rank's groups."""
        from megatron.core import parallel_state as ps  # megatron-core: imported on use

        ps.initialize_model_parallel(**self.parallel.megatron_sizes(),
                                     distributed_timeout_minutes=timeout_minutes)
        return ProcessGroups(
            tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            dp=ps.get_data_parallel_group(with_context_parallel=False),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            dp_rank=ps.get_data_parallel_rank(),
            is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
            is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)

    @staticmethod
    def destroy() -> None:
        """Undoes ``build`` (megatron-core keeps its groups in module state)."""
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
