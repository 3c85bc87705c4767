"""Global parameter names: one name per tensor whatever the parallel layout.

A rank's chunk names its layers and experts by local index; loading Hugging Face weights,
layout-independent initialisation and the tests' gathering need the global ones. Below
``model`` and ``hf_mapping``, which both use it.
"""

from __future__ import annotations

import torch


def global_parameter_names(chunk: torch.nn.Module):
    """(global parameter name, parameter): local layer indices replaced by global ones, and
    under expert parallelism local expert indices by global ones (``local_experts.j`` of EP
    rank r is expert ``r * experts_per_rank + j``)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers, experts = {}, {}
    for name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer):
            layers[name + "."] = name.rsplit(".", 1)[0] + f".{module.layer_number - 1}."
        elif isinstance(module, SequentialMLP):
            first = (parallel_state.get_expert_model_parallel_rank()
                     * module.num_local_experts)
            for j in range(module.num_local_experts):
                experts[f"{name}.local_experts.{j}."] = f"{name}.local_experts.{first + j}."
    for name, param in chunk.named_parameters():
        for table in (experts, layers):  # the deeper prefix first
            for local, global_prefix in table.items():
                if name.startswith(local):
                    name = global_prefix + name[len(local):]
                    break
        yield name, param
