"""AdaDPO for megatron-core: preference losses over tensor-, pipeline- and context-parallel models.

The package has four layers, each importing only the ones below it (data stands beside ops
and mcore, importing neither):

    ops/       the maths: the AdaDPO coefficient and the losses, vocab-parallel and fused
               log-probs, the TP and CP reductions (torch and process groups only)
    mcore/     the hook into megatron-core: forward steps for its schedules, GPTModel building,
               the CPU compatibility layer
    data/      reading, tokenising and batching preference pairs (no megatron, no trainer)
    training/  the application: trainer, checkpoints, reference cache, run config, commands

What users call is re-exported here:

    from adadpo_megatron import LossConfig, preference_loss, PreferenceForwardStep

Importing this package needs torch only: megatron-core and datasets are imported on use.
docs/ARCHITECTURE.md walks through a step.
"""

from adadpo_megatron.data.micro_batches import PairDataset
from adadpo_megatron.mcore.forward_step import (
    PreferenceForwardStep,
    ReferenceForwardStep,
    SFTForwardStep,
    collect_reference,
    reduce_reports,
)
from adadpo_megatron.ops.batch_statistics import RewardRunningMean
from adadpo_megatron.ops.logprobs import sequence_logprobs, vocab_parallel_logprobs
from adadpo_megatron.ops.loss import (
    LengthTails,
    PairStats,
    adadpo_coefficient,
    coefficient_log_ratio,
    preference_loss,
)
from adadpo_megatron.ops.loss_config import LossConfig

__version__ = "0.2.0"

__all__ = [
    "LengthTails",
    "LossConfig",
    "PairDataset",
    "PairStats",
    "PreferenceForwardStep",
    "ReferenceForwardStep",
    "RewardRunningMean",
    "SFTForwardStep",
    "adadpo_coefficient",
    "coefficient_log_ratio",
    "collect_reference",
    "preference_loss",
    "reduce_reports",
    "sequence_logprobs",
    "vocab_parallel_logprobs",
]
