"""megatron-core's process groups as the defaults of the log-prob ops.

The ops (adadpo_megatron.ops) take their tensor- and context-parallel groups from the caller,
None meaning no reduction, and never import megatron-core. Here, a group left as None is
megatron-core's group of that kind when its model parallelism is initialised (else None):
``default_group``, and the ops with that default, which ``import adadpo_megatron`` exports,
so that a caller inside a megatron-core run gets the reduction without naming the group.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from adadpo_megatron.ops import logprobs as _ops

_GETTERS = {"tp": "get_tensor_model_parallel_group", "cp": "get_context_parallel_group"}


def default_group(group: Optional[ProcessGroup], kind: str) -> Optional[ProcessGroup]:
    """``group``; if None, megatron-core's ``kind`` ("tp" or "cp") group when model
    parallelism is initialised, else None (no reduction)."""
    if group is not None or not (dist.is_available() and dist.is_initialized()):
        return group
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return getattr(parallel_state, _GETTERS[kind])()


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, *,
                            tp_group: Optional[ProcessGroup] = None, ignore_index: int = -100,
                            chunk_size: Optional[int] = None) -> Tensor:
    """adadpo_megatron.ops.logprobs.vocab_parallel_logprobs, ``tp_group`` defaulting to
    megatron-core's tensor-parallel group."""
    return _ops.vocab_parallel_logprobs(logits, labels, tp_group=default_group(tp_group, "tp"),
                                        ignore_index=ignore_index, chunk_size=chunk_size)


def sequence_logprobs(token_logps: Tensor, loss_mask: Tensor, *,
                      cp_group: Optional[ProcessGroup] = None,
                      segment_ids: Optional[Tensor] = None,
                      num_segments: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """adadpo_megatron.ops.logprobs.sequence_logprobs, ``cp_group`` defaulting to
    megatron-core's context-parallel group."""
    return _ops.sequence_logprobs(token_logps, loss_mask, cp_group=default_group(cp_group, "cp"),
                                  segment_ids=segment_ids, num_segments=num_segments)
