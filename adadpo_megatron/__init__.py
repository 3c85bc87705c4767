"""AdaDPO for megatron-core: preference losses over tensor-, pipeline- and context-parallel models.

The package has four layers, each importing only the ones below it (data stands beside ops
and mcore, importing neither):

    ops/       the maths: the AdaDPO coefficient and the losses, vocab-parallel and fused
               log-probs, the TP and CP reductions (torch and process groups only)
    mcore/     the hook into megatron-core: forward steps for its schedules, GPTModel building,
               the CPU compatibility layer
    data/      reading, tokenising and batching preference pairs (no megatron, no trainer)
    training/  the application: trainer, checkpoints, reference cache, run config, commands

and, on top, ``integrations/megatron_lm``: the plug-in for Megatron-LM's own ``pretrain()``.

What users call is re-exported here (the loss and its log-probs, the forward steps for
megatron-core's schedules, reading and batching preference data, the CPU layer):

    from adadpo_megatron import LossConfig, preference_loss, PreferenceForwardStep

and the application (Trainer, load_run_config, ...) from ``adadpo_megatron.training``;
Megatron-LM's providers from ``adadpo_megatron.integrations.megatron_lm``.

Importing this package imports nothing else: what it exports is imported on first use (torch
then; megatron-core and datasets where they are used).
docs/ARCHITECTURE.md walks through a step.
"""

from __future__ import annotations

import importlib

# {name: module}: imported on first use (PEP 562), so that ``import adadpo_megatron`` costs
# nothing and a command's signal handlers are installed before torch's seconds of import
_EXPORTS = {
    "PairDataset": "data.micro_batches", "split_held_out": "data.micro_batches",
    "step_micro_batches": "data.micro_batches",
    "IGNORE_INDEX": "data.preference_data", "DataSettings": "data.preference_data",
    "PreferenceDataset": "data.preference_data", "load_preference_data": "data.preference_data",
    "ByteTokenizer": "data.tokenizers", "build_tokenizer": "data.tokenizers",
    "PreferenceForwardStep": "mcore.forward_step", "ReferenceForwardStep": "mcore.forward_step",
    "SFTForwardStep": "mcore.forward_step", "collect_reference": "mcore.forward_step",
    "reduce_reports": "mcore.forward_step",
    # the ops with megatron-core's groups as defaults (ops.logprobs: explicit groups only)
    "sequence_logprobs": "mcore.parallel_groups",
    "vocab_parallel_logprobs": "mcore.parallel_groups",
    "RewardRunningMean": "ops.batch_statistics",
    "LengthTails": "ops.loss", "PairStats": "ops.loss", "adadpo_coefficient": "ops.loss",
    "coefficient_log_ratio": "ops.loss", "preference_loss": "ops.loss",
    "LossConfig": "ops.loss_config",
}
_SUBMODULES = {"cpu_compat": "mcore.cpu_compat"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{_SUBMODULES[name]}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


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
