"""Padding-free micro-batches: which pairs go where, for ``data.packing`` none, longest, pack.

A step's plan is a pure function of the step's pairs (themselves a pure function of seed and
step) and the layout, computed identically on every rank for every rank, so resuming continues
exactly and the real-token share of the whole step is known without a collective:

    none     m pairs per micro-batch, every sequence a row of seq_length tokens (2m rows).
    longest  the same pairs, sorted by length within the data-parallel rank, each micro-batch
             cut to its longest row rounded up to ``multiple`` (FP8, SP and CP alignment).
    pack     a micro-batch is ``2m`` rows (``m`` for SFT) of at most seq_length tokens. Each
             sequence of a pair (prompt + chosen, prompt + rejected) is a segment; the two
             segments of a pair are always in the same micro-batch. Pairs are spread over
             data-parallel ranks and micro-batches by token count (longest first, each to
             the least-loaded micro-batch it fits in), every rank getting the same number of
             micro-batches; within a micro-batch each segment goes to the least-filled row it
             fits in, so the rows come out about equally full, and the micro-batch is cut to
             its fullest row (rounded up to ``multiple``). Each segment is padded to a
             multiple of ``segment_multiple`` (2 x CP under context parallelism:
             megatron-core and Transformer Engine split every segment in 2 x CP chunks).

A packed micro-batch has the keys of ``micro_batches.collate`` with rows of packed segments,
plus ``segment_ids``:

    tokens, labels, loss_mask  [R, L]  as in collate, segment after segment (L <= S)
    position_ids  [R, L] long   restarting at 0 at every segment
    segment_ids   [R, L] long   the segment of each token (its alignment padding included),
                                -1 on the padding that ends a row
    example_ids   [m]    long

Segments are numbered chosen first: pair j's chosen sequence is segment j, its rejected one
segment m + j (SFT: segment j), so per-segment sums line up with the chosen-first layout of
an unpacked micro-batch and the loss code does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from adadpo_megatron.data.preference_data import IGNORE_INDEX, PreferenceDataset

PACKING_MODES = ("none", "longest", "pack")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch of one data-parallel rank.

    Fields:
        pairs: dataset indices of its pairs, in order (pair j of the micro-batch).
        rows: rows of the tensors it becomes.
        length: tokens per row.
        placements: pack only: (row, offset, padded length) of every segment, in segment
            order.
        real_tokens: tokens of its sequences that are not padding.
    """

    pairs: Tuple[int, ...]
    rows: int
    length: int
    real_tokens: int
    placements: Optional[Tuple[Tuple[int, int, int], ...]] = None

    @property
    def computed_tokens(self) -> int:
        return self.rows * self.length


StepPlan = List[List[MicroBatchPlan]]  # [data-parallel rank][micro-batch]


def plan_step(lengths: torch.Tensor, indices: Sequence[int], *, mode: str, dp_size: int,
              micro_batch_size: int, seq_length: int, multiple: int = 1,
              segment_multiple: int = 1, sides: int = 2,
              min_micro_batches: int = 1) -> StepPlan:
    """Every data-parallel rank's micro-batches for the pairs ``indices``.

    Args:
        lengths: [N, 2] long, tokens each sequence of the dataset occupies
            (``PreferenceDataset.lengths``).
        indices: the pairs of this step (or of an evaluation), in sampler order.
        mode: "none", "longest" or "pack".
        micro_batch_size: pairs per micro-batch for none and longest; for pack the micro-batch
            has ``sides * micro_batch_size`` rows and holds as many pairs as fit.
        multiple: longest and pack round each micro-batch's length up to it (FP8, sequence
            and context parallelism need it). Must divide ``seq_length``.
        segment_multiple: pack pads every segment to it (2 x CP). Must divide ``multiple``.
        sides: 2 (chosen and rejected) or 1 (the chosen alone, for SFT).
        min_micro_batches: pack makes at least this many micro-batches per rank (as far as
            there are pairs): megatron-core's interleaved pipeline schedule needs as many
            as pipeline stages.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"data.packing={mode!r} is not allowed; choose one of "
                         f"{', '.join(PACKING_MODES)}")
    if seq_length % multiple or multiple % segment_multiple:
        raise ValueError(f"data.seq_length({seq_length}) is not a multiple of the sequence "
                         f"alignment {multiple}, or that of the segment alignment "
                         f"{segment_multiple}")
    indices = [int(i) for i in indices]
    # {pair: [tokens of each side]}; a step spanning two epochs may hold a pair twice
    seq_lengths = dict(zip(indices, lengths[indices, :sides].tolist(), strict=True))
    if mode == "pack":
        return _plan_packed(indices, seq_lengths, dp_size=dp_size,
                            rows=sides * micro_batch_size, seq_length=seq_length,
                            multiple=multiple, segment_multiple=segment_multiple,
                            min_micro_batches=min_micro_batches)
    blocks = [list(block) for block in _split_evenly(indices, dp_size)]
    plan = []
    for block in blocks:
        if mode == "longest":  # neighbours of similar length share a micro-batch
            block.sort(key=lambda i: (max(seq_lengths[i]), i))
        rank_plan = []
        for start in range(0, len(block), micro_batch_size):
            pairs = tuple(block[start:start + micro_batch_size])
            real = sum(sum(seq_lengths[i]) for i in pairs)
            length = seq_length
            if mode == "longest":
                length = min(seq_length,
                             round_up(max(max(seq_lengths[i]) for i in pairs), multiple))
            rank_plan.append(MicroBatchPlan(pairs, sides * len(pairs), length, real))
        plan.append(rank_plan)
    return plan


def _split_evenly(indices: List[int], parts: int) -> List[List[int]]:
    """Contiguous blocks whose sizes differ by at most one (rank r takes block r)."""
    base, extra = divmod(len(indices), parts)
    out, start = [], 0
    for r in range(parts):
        size = base + (r < extra)
        out.append(indices[start:start + size])
        start += size
    return out


class _Bin:
    """One packed micro-batch being filled: rows of fixed capacity."""

    def __init__(self, rows: int, capacity: int):
        self.fill = [0] * rows
        self.capacity = capacity
        self.load = 0
        self.pairs: List[int] = []
        self.where = {}  # (pair, side) -> (row, offset, padded length)

    def try_place(self, segment_lengths: Sequence[int]) -> Optional[List[Tuple[int, int]]]:
        """Places for the segments (longest first), each in the least-filled row it fits in,
        or None; changes nothing. Least-filled rather than first-fit keeps the rows about
        equally full, so cutting the micro-batch to its fullest row cuts off the padding."""
        fill = list(self.fill)
        places: List[Optional[Tuple[int, int]]] = [None] * len(segment_lengths)
        for side in sorted(range(len(segment_lengths)), key=lambda s: -segment_lengths[s]):
            size = segment_lengths[side]
            fitting = [r for r, used in enumerate(fill) if used + size <= self.capacity]
            if not fitting:
                return None
            row = min(fitting, key=lambda r: (fill[r], r))
            places[side] = (row, fill[row])
            fill[row] += size
        return places

    def place(self, pair: int, segment_lengths: Sequence[int], places) -> None:
        for side, (row, offset) in enumerate(places):
            self.where[(pair, side)] = (row, offset, segment_lengths[side])
            self.fill[row] = max(self.fill[row], offset + segment_lengths[side])
        self.load += sum(segment_lengths)
        self.pairs.append(pair)


def _plan_packed(indices: List[int], seq_lengths, *, dp_size: int, rows: int, seq_length: int,
                 multiple: int, segment_multiple: int, min_micro_batches: int) -> StepPlan:
    padded = {i: [round_up(n, segment_multiple) for n in seq_lengths[i]] for i in indices}
    if any(n > seq_length for sizes in padded.values() for n in sizes):
        raise ValueError(f"a sequence is longer than data.seq_length({seq_length}); the data "
                         "pipeline truncates to it, so the dataset and the config disagree")
    # Longest pair first; ties by position in the step, so the plan is deterministic.
    order = sorted(range(len(indices)), key=lambda p: (-sum(padded[indices[p]]), p))
    total = sum(sum(sizes) for sizes in padded.values())
    most = max(1, len(indices) // dp_size)  # one pair per micro-batch: every pair fits
    per_rank = min(most, max(min_micro_batches, math.ceil(total / (dp_size * rows * seq_length))))
    while True:
        bins = [_Bin(rows, seq_length) for _ in range(dp_size * per_rank)]
        if _fill(bins, order, indices, padded):
            break
        if per_rank >= most:
            raise ValueError(f"cannot pack {len(indices)} pairs into micro-batches of {rows} "
                             f"rows of {seq_length} tokens on {dp_size} data-parallel ranks")
        per_rank += 1  # fragmentation: one more micro-batch per rank
    plan = []
    for rank in range(dp_size):
        rank_plan = []
        for b in bins[rank * per_rank:(rank + 1) * per_rank]:
            positions = sorted(b.pairs)
            pairs = tuple(indices[p] for p in positions)
            sides = len(padded[pairs[0]])
            placements = tuple(b.where[(p, side)] for side in range(sides) for p in positions)
            real = sum(sum(seq_lengths[i]) for i in pairs)
            length = min(seq_length, round_up(max(b.fill), multiple))
            rank_plan.append(MicroBatchPlan(pairs, rows, length, real, placements))
        plan.append(rank_plan)
    return plan


def _fill(bins: List[_Bin], order: List[int], indices: List[int], padded) -> bool:
    """Longest-processing-time assignment: each pair to the least-loaded bin it fits in.
    Empty bins are the least loaded, so with no more bins than pairs none stays empty."""
    for position in order:
        sizes = padded[indices[position]]
        for b in sorted(range(len(bins)), key=lambda k: (bins[k].load, k)):
            places = bins[b].try_place(sizes)
            if places is not None:
                bins[b].place(position, sizes, places)
                break
        else:
            return False
    return all(b.pairs for b in bins)


def materialize(dataset: PreferenceDataset, plan: MicroBatchPlan, *, pad_id: int,
                chosen_only: bool = False):
    """The tensors of one planned micro-batch (keys in the module docstring)."""
    from adadpo_megatron.data.micro_batches import collate

    indices = torch.tensor(plan.pairs, dtype=torch.long)
    if plan.placements is None:
        batch = collate(dataset, indices, chosen_only)
        if plan.length < batch["tokens"].shape[1]:
            batch = {k: (v[:, :plan.length].contiguous() if v.dim() == 2 else v)
                     for k, v in batch.items()}
        return batch
    return _packed_tensors(dataset, plan, pad_id, sides=1 if chosen_only else 2)


def _packed_tensors(dataset: PreferenceDataset, plan: MicroBatchPlan, pad_id: int, sides: int):
    rows, length = plan.rows, plan.length
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((rows, length), dtype=torch.long)
    segments = torch.full((rows, length), -1, dtype=torch.long)
    m = len(plan.pairs)
    seq_lengths = dataset.lengths
    for side in range(sides):
        for j, pair in enumerate(plan.pairs):
            segment = side * m + j
            row, offset, size = plan.placements[segment]
            n = int(seq_lengths[pair, side])
            tokens[row, offset:offset + n] = dataset.tokens[pair, side, :n]
            labels[row, offset:offset + n] = dataset.labels[pair, side, :n]
            segments[row, offset:offset + size] = segment
            positions[row, offset:offset + size] = torch.arange(size)
    return {"tokens": tokens, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).float(),
            "position_ids": positions, "segment_ids": segments,
            "example_ids": dataset.example_ids[list(plan.pairs)]}


def step_token_counts(plan: StepPlan) -> Tuple[int, int]:
    """(real tokens, computed tokens) of a whole step, over every data-parallel rank."""
    real = sum(mb.real_tokens for rank in plan for mb in rank)
    computed = sum(mb.computed_tokens for rank in plan for mb in rank)
    return real, computed
