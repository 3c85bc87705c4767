"""AdaDPO for megatron-core: preference losses over tensor-, pipeline- and context-parallel models.

The package has four layers, each importing only the ones below it (data stands beside ops
and mcore, importing neither):

    ops/       the maths: the AdaDPO coefficient and the losses, vocab-parallel and fused
               log-probs, the TP and CP reductions (torch and process groups only)
    mcore/     the hook into megatron-core: forward steps for its schedules, GPTModel building,
               the CPU compatibility layer
    data/      reading, tokenising and batching preference pairs (no megatron, no trainer)
    training/  the application: trainer, checkpoints, reference cache, run config, commands

What users call is re-exported here (the loss and its log-probs, the forward steps for
megatron-core's schedules, reading and batching preference data, the CPU layer):

    from adadpo_megatron import LossConfig, preference_loss, PreferenceForwardStep

and the application (Trainer, load_run_config, ...) from ``adadpo_megatron.training``.

Importing this package needs torch only: megatron-core and datasets are imported on use.
docs/ARCHITECTURE.md walks through a step.
"""

from adadpo_megatron.data.micro_batches import PairDataset, split_held_out, step_micro_batches
from adadpo_megatron.data.preference_data import (
    IGNORE_INDEX,
    DataSettings,
    PreferenceDataset,
    load_preference_data,
)
from adadpo_megatron.data.tokenizers import ByteTokenizer, build_tokenizer
from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.forward_step import (
    PreferenceForwardStep,
    ReferenceForwardStep,
    SFTForwardStep,
    collect_reference,
    reduce_reports,
)

# the ops with megatron-core's groups as defaults (adadpo_megatron.ops.logprobs: explicit only)
from adadpo_megatron.mcore.parallel_groups import sequence_logprobs, vocab_parallel_logprobs
from adadpo_megatron.ops.batch_statistics import RewardRunningMean
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
    "IGNORE_INDEX",
    "ByteTokenizer",
    "DataSettings",
    "LengthTails",
    "LossConfig",
    "PairDataset",
    "PairStats",
    "PreferenceDataset",
    "PreferenceForwardStep",
    "ReferenceForwardStep",
    "RewardRunningMean",
    "SFTForwardStep",
    "adadpo_coefficient",
    "build_tokenizer",
    "coefficient_log_ratio",
    "collect_reference",
    "cpu_compat",
    "load_preference_data",
    "preference_loss",
    "reduce_reports",
    "sequence_logprobs",
    "split_held_out",
    "step_micro_batches",
    "vocab_parallel_logprobs",
]
