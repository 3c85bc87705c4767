"""The micro-batch: what the data side builds and megatron-core's forward step consumes.

One definition for both sides (``data`` builds it, ``mcore`` reads it; neither imports the
other). It is a typed dict rather than a dataclass because Megatron-LM's own data loaders
hand the forward step plain dicts (``PairDataset`` items stacked by its collate), and a
typed dict types those same objects without a conversion at every boundary.

A micro-batch holds ``m`` whole pairs. Its sequences are the m chosen ones first, then the m
rejected ones (pair i = sequences i and i + m; supervised warm-up keeps the m chosen alone).

Rows (``data.packing`` none or longest), one sequence a row, ``L`` = seq_length or the
micro-batch's longest row:

    tokens        [2m, L] long   input ids, padded with the tokenizer's pad id
    labels        [2m, L] long   next-token ids on response tokens, -100 elsewhere
    loss_mask     [2m, L] float  1 on response tokens (labels != -100)
    position_ids  [2m, L] long
    example_ids   [m]     long   each pair's row in the source (0-based)
    ref_logps     [2m]    float  the reference's sums, once known (precomputed, or filled in
                                 by the reference forward before the policy's)

Packed (``data.packing`` pack): each sequence is a segment of a row ``[R, L]``, every
sequence key ``[R, L]``, plus

    segment_ids   [R, L]  long   the segment (sequence) index, -1 on row padding

and, flattened for Transformer Engine's THD attention (``thd_flatten``), every sequence key
``[1, R * L]`` plus

    cu_seqlens    [runs + 1] int32  cumulative lengths of the segments and row paddings
    max_seqlen    int               the longest run

LD-DPO adds ``ld_tail_mask`` (like loss_mask) inside the forward step, and a packed batch
for megatron-core's local layers its block-diagonal ``attention_mask`` [R, 1, L, L] (bool,
True where masked; a context-parallel split cuts its query rows only). An evaluation may
pad each rank's micro-batches to the schedule's count with copies marked

    filler        bool                  True: the forward step counts it for nothing
"""


from typing import NotRequired, TypedDict

import torch


class MicroBatch(TypedDict):
    """The keys and shapes of the module docstring: tokens, labels, loss_mask and
    position_ids always (example_ids too in a packed batch), the others where the layout has
    them."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    example_ids: NotRequired[torch.Tensor]  # required packed (it counts the segments)
    ref_logps: NotRequired[torch.Tensor]
    segment_ids: NotRequired[torch.Tensor]
    cu_seqlens: NotRequired[torch.Tensor]
    max_seqlen: NotRequired[int]
    ld_tail_mask: NotRequired[torch.Tensor]
    attention_mask: NotRequired[torch.Tensor]
    filler: NotRequired[bool]


REQUIRED_KEYS = tuple(sorted(MicroBatch.__required_keys__))
# the keys with a sequence dimension (the last), which context parallelism splits and THD
# flattens
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids",
                 "ld_tail_mask")


def check_micro_batch(batch) -> None:
    """Raises ValueError naming what a micro-batch (from this project's planner or from a
    user's loader) lacks or has of the wrong kind, before it reaches the model."""
    if not isinstance(batch, dict):
        raise ValueError(f"a micro-batch must be a dict of tensors (adadpo_megatron."
                         f"micro_batch.MicroBatch), got {type(batch).__name__}")
    required = REQUIRED_KEYS + (("example_ids",) if "segment_ids" in batch else ())
    missing = [key for key in required if key not in batch]
    if missing:
        raise ValueError(f"the micro-batch has no {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(map(repr, sorted(batch)))}); every micro-batch holds "
                         f"{', '.join(required)} (adadpo_megatron.micro_batch)")
    shape = batch["tokens"].shape
    wrong = [key for key in SEQUENCE_KEYS if key in batch and batch[key].shape != shape]
    if wrong:
        raise ValueError(f"the micro-batch's {', '.join(map(repr, wrong))} do not have the "
                         f"shape of its tokens {tuple(shape)}: "
                         f"{', '.join(str(tuple(batch[k].shape)) for k in wrong)}")
