"""Padding-free micro-batches: which pairs go where, for ``data.packing`` none, longest, pack.

A step's plan is a pure function of the step's pairs (themselves a pure function of seed and
step) and the layout, computed identically on every rank for every rank, so resuming continues
exactly and the real-token share of the whole step is known without a collective:

    none     m pairs per micro-batch, every sequence a row of seq_length tokens (2m rows).
    longest  the same pairs, sorted by length within the data-parallel rank, each micro-batch
             cut to its longest row rounded up to ``multiple`` (FP8, SP and CP alignment).
    pack     each sequence of a pair (prompt + chosen, prompt + rejected) is a segment, padded
             to ``segment_multiple`` (2 x CP: megatron-core and Transformer Engine split every
             segment in 2 x CP chunks). A micro-batch holds at most ``max_tokens`` tokens
             (``data.max_tokens_per_micro_batch``, by default 2 x micro_batch_size x
             seq_length): rows of seq_length filled first-fit, longest segment first, or, for
             THD (``one_sequence``), a single sequence of its segments end to end. The two
             segments of a pair are always in the same micro-batch. The step makes as few
             micro-batches as its pairs need, the same number on every data-parallel rank (a
             multiple of ``micro_batch_multiple``: the interleaved pipeline schedule needs a
             multiple of the pipeline size), with the pairs spread longest first to the least
             loaded rank and, within it, the least loaded micro-batch they fit in. A micro-batch
             of rows is cut to its fullest row (rounded up to ``multiple``), so its segments
             are then laid out in whichever of a few layouts computes least: as few rows as
             its tokens need up to as many as first-fit used, spread evenly or filled in turn.

``micro_batch_size`` only sizes the default token budget of pack, so a large micro-batch size
packs as tightly as a small one.

Training steps always plan (the run config refuses, up front, a layout whose steps could not
be planned: under the interleaved schedule each data-parallel rank's pairs must be a multiple
of the pipeline size). An evaluation's held-out set has whatever size it has, so its plan
(``fill=True``) may add *filler* micro-batches: copies of a real one, marked ``filler``, that
the forward step counts for nothing, so that every rank runs the same number of micro-batches,
a multiple of ``micro_batch_multiple``, whatever the number and lengths of the pairs.

A packed micro-batch is laid out as ``adadpo_megatron.micro_batch`` defines it: rows of
segments laid end to end (L <= seq_length; THD: one row, L <= max_tokens), ``position_ids``
restarting at 0 at every segment, ``segment_ids`` marking each token's segment (its alignment
padding included) and -1 on the padding that ends a row.

Segments are numbered chosen first: pair j's chosen sequence is segment j, its rejected one
segment m + j (SFT: segment j), so per-segment sums line up with the chosen-first layout of
an unpacked micro-batch and the loss code does not change.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from adadpo_megatron.data.micro_batches import collate
from adadpo_megatron.data.preference_data import IGNORE_INDEX, PreferenceDataset
from adadpo_megatron.micro_batch import MicroBatch

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
        real_tokens: tokens of its sequences that are not padding (0 for a filler).
        filler: a copy of another micro-batch that counts for nothing (evaluation only).
    """

    pairs: Tuple[int, ...]
    rows: int
    length: int
    real_tokens: int
    placements: Optional[Tuple[Tuple[int, int, int], ...]] = None
    filler: bool = False

    def as_filler(self) -> MicroBatchPlan:
        return dataclasses.replace(self, real_tokens=0, filler=True)

    @property
    def computed_tokens(self) -> int:
        return self.rows * self.length


StepPlan = List[List[MicroBatchPlan]]  # [data-parallel rank][micro-batch]


def plan_step(lengths: torch.Tensor, indices: Sequence[int], *, mode: str, dp_size: int,
              micro_batch_size: int, seq_length: int, multiple: int = 1,
              segment_multiple: int = 1, sides: int = 2, max_tokens: Optional[int] = None,
              one_sequence: bool = False, micro_batch_multiple: int = 1,
              fill: bool = False) -> StepPlan:
    """Every data-parallel rank's micro-batches for the pairs ``indices``.

    Args:
        lengths: [N, 2] long, tokens each sequence of the dataset occupies
            (``PreferenceDataset.lengths``).
        indices: the pairs of this step (or of an evaluation), in sampler order.
        mode: "none", "longest" or "pack".
        micro_batch_size: pairs per micro-batch for none and longest; for pack it only sets
            the default ``max_tokens``.
        multiple: longest and pack round each micro-batch's length up to it (FP8, sequence
            and context parallelism need it). Must divide ``seq_length``.
        segment_multiple: pack pads every segment to it (2 x CP). Must divide ``multiple``.
        sides: 2 (chosen and rejected) or 1 (the chosen alone, for SFT).
        max_tokens: pack: tokens a micro-batch may compute (rows x row length), at least
            ``sides * seq_length`` so that any pair fits; None means
            ``sides * micro_batch_size * seq_length``.
        one_sequence: pack: each micro-batch is one row of its segments end to end (THD)
            instead of rows of ``seq_length``.
        micro_batch_multiple: each rank's micro-batch count is a multiple of it (megatron-core's
            interleaved schedule needs a multiple of the pipeline size). none and longest
            reach it only with ``fill`` (training steps have it by the config's checks).
        fill: add filler micro-batches (``MicroBatchPlan.filler``) where the pairs alone cannot
            give every rank the same count, a multiple of ``micro_batch_multiple``: for
            evaluation, whose held-out set has any size. Without it such a step raises.
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
        if max_tokens is None:
            max_tokens = sides * micro_batch_size * seq_length
        if max_tokens < sides * seq_length:
            raise ValueError(f"data.max_tokens_per_micro_batch({max_tokens}) is below "
                             f"{sides} x data.seq_length({seq_length}), what one pair may need")
        if one_sequence:
            shape = _BinShape(row_capacity=max_tokens // multiple * multiple, max_rows=1)
        else:
            shape = _BinShape(row_capacity=seq_length, max_rows=max_tokens // seq_length)
        plan = _plan_packed(indices, seq_lengths, dp_size=dp_size, shape=shape,
                            seq_length=seq_length, multiple=multiple,
                            segment_multiple=segment_multiple,
                            micro_batch_multiple=micro_batch_multiple, fill=fill)
        return _with_fillers(plan, micro_batch_multiple) if fill else plan
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
    return _with_fillers(plan, micro_batch_multiple) if fill else plan


def _with_fillers(plan: StepPlan, micro_batch_multiple: int) -> StepPlan:
    """Every rank's micro-batches, then copies of its last one (of the first rank's first,
    for a rank without pairs) marked filler, up to one count for all ranks that is a
    multiple of ``micro_batch_multiple``."""
    count = round_up(max(1, max(len(rank) for rank in plan)), micro_batch_multiple)
    donor = next(mb for rank in plan for mb in rank if not mb.filler)
    return [[*rank, *[(rank[-1] if rank else donor).as_filler()] * (count - len(rank))]
            for rank in plan]


def _split_evenly(indices: List[int], parts: int) -> List[List[int]]:
    """Contiguous blocks whose sizes differ by at most one (rank r takes block r)."""
    base, extra = divmod(len(indices), parts)
    out, start = [], 0
    for r in range(parts):
        size = base + (r < extra)
        out.append(indices[start:start + size])
        start += size
    return out


@dataclass(frozen=True)
class _BinShape:
    """What one packed micro-batch may hold: up to ``max_rows`` rows of ``row_capacity``."""

    row_capacity: int
    max_rows: int


class _Bin:
    """One packed micro-batch being filled: its pairs and the row of each segment."""

    def __init__(self, shape: _BinShape):
        self.shape = shape
        self.fill: List[int] = []  # tokens in each row opened so far
        self.load = 0
        self.pairs: List[int] = []  # positions in the step
        self.row_of: Dict[Tuple[int, int], int] = {}  # (position, side) -> row

    def try_place(self, sizes: Sequence[int]) -> Optional[List[int]]:
        """A row for each segment, longest first, each in the first row it fits in (a new
        row while there are fewer than max_rows), or None; changes nothing."""
        fill = list(self.fill)
        rows: List[int] = [0] * len(sizes)
        for side in sorted(range(len(sizes)), key=lambda s: -sizes[s]):
            row = next((r for r, used in enumerate(fill)
                        if used + sizes[side] <= self.shape.row_capacity), None)
            if row is None:
                if len(fill) == self.shape.max_rows:
                    return None
                fill.append(0)
                row = len(fill) - 1
            rows[side] = row
            fill[row] += sizes[side]
        return rows

    def place(self, position: int, sizes: Sequence[int], rows: Sequence[int]) -> None:
        for side, row in enumerate(rows):
            self.fill += [0] * (row + 1 - len(self.fill))  # rows try_place opened
            self.fill[row] += sizes[side]
            self.row_of[(position, side)] = row
        self.load += sum(sizes)
        self.pairs.append(position)


def _rows_of(sizes: Dict[Tuple[int, int], int], rows: int, capacity: int,
             spread: bool) -> Optional[Dict[Tuple[int, int], int]]:
    """Segments longest first into ``rows`` rows of ``capacity``: each to the least-filled row
    it fits in (``spread``: rows come out about equally full) or to the first (rows come out
    as full as they get); None where one does not fit."""
    fill = [0] * rows
    row_of = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        fitting = [r for r, used in enumerate(fill) if used + sizes[key] <= capacity]
        if not fitting:
            return None
        row = min(fitting, key=lambda r: (fill[r], r)) if spread else fitting[0]
        row_of[key] = row
        fill[row] += sizes[key]
    return row_of


def _computed_tokens(row_of: Dict[Tuple[int, int], int], sizes: Dict[Tuple[int, int], int],
                     multiple: int) -> int:
    """Rows x the fullest row rounded up: what a micro-batch with these rows computes."""
    fill: Dict[int, int] = {}
    for key, row in row_of.items():
        fill[row] = fill.get(row, 0) + sizes[key]
    return len(fill) * round_up(max(fill.values()), multiple)


def _plan_packed(indices: List[int], seq_lengths, *, dp_size: int, shape: _BinShape,
                 seq_length: int, multiple: int, segment_multiple: int,
                 micro_batch_multiple: int, fill: bool = False) -> StepPlan:
    padded = [[round_up(n, segment_multiple) for n in seq_lengths[i]] for i in indices]
    if any(n > seq_length for sizes in padded for n in sizes):
        raise ValueError(f"a sequence is longer than data.seq_length({seq_length}); the data "
                         "pipeline truncates to it, so the dataset and the config disagree")
    # Longest pair first; ties by position in the step, so the plan is deterministic.
    order = sorted(range(len(indices)), key=lambda p: (-sum(padded[p]), p))
    capacity = shape.row_capacity * shape.max_rows
    # without fillers every micro-batch needs a pair; with them each pair can have its own
    most = (round_up(len(indices), micro_batch_multiple) if fill else
            len(indices) // dp_size // micro_batch_multiple * micro_batch_multiple)
    if most == 0:
        raise ValueError(f"{len(indices)} pairs cannot make {micro_batch_multiple} "
                         f"micro-batch(es) on each of {dp_size} data-parallel ranks (the "
                         "interleaved pipeline schedule needs a multiple of the pipeline size): "
                         "every micro-batch needs a pair")
    fewest = math.ceil(sum(map(sum, padded)) / (dp_size * capacity))
    per_rank = min(most, max(1, round_up(fewest, micro_batch_multiple)))
    while (bins := _fill(dp_size, per_rank, shape, order, padded, every_bin=not fill)) is None:
        if per_rank >= most:
            raise ValueError(f"cannot pack {len(indices)} pairs into {per_rank} micro-batches "
                             f"of {shape.max_rows} row(s) of {shape.row_capacity} tokens on "
                             f"each of {dp_size} data-parallel ranks")
        per_rank += micro_batch_multiple  # fragmentation: more micro-batches per rank
    return [[_micro_batch(b, indices, padded, seq_lengths, multiple)
             for b in bins[rank * per_rank:(rank + 1) * per_rank] if b.pairs]
            for rank in range(dp_size)]


def _fill(dp_size: int, per_rank: int, shape: _BinShape, order: List[int],
          padded: List[List[int]], every_bin: bool = True) -> Optional[List[_Bin]]:
    """``per_rank`` bins on each rank, rank after rank, holding every pair, or None.

    Each pair, longest first, goes to the least loaded rank and there to the least loaded bin
    it fits in; with ``every_bin``, once no more pairs are left than bins are empty, only to
    an empty bin, so that no bin stays empty (else empty bins are allowed: they become
    fillers). Ranks wait in a heap by load: a step of 2048 pairs over 64 ranks plans in about
    0.1 s on one CPU core (0.8 s sorting every bin for every pair)."""
    bins = [_Bin(shape) for _ in range(dp_size * per_rank)]
    ranks = [(0, rank) for rank in range(dp_size)]  # a heap of (load, rank)
    empty = len(bins)
    for left, position in enumerate(order):
        sizes, must_open = padded[position], every_bin and len(order) - left <= empty
        popped, placed = [], None
        while ranks and placed is None:
            popped.append(heapq.heappop(ranks))
            rank = popped[-1][1]
            for k in sorted(range(rank * per_rank, (rank + 1) * per_rank),
                            key=lambda k: (bins[k].load, k)):
                rows = None if must_open and bins[k].pairs else bins[k].try_place(sizes)
                if rows is not None:
                    empty -= not bins[k].pairs
                    bins[k].place(position, sizes, rows)
                    placed = rank
                    break
        if placed is None:
            return None
        for load, rank in popped:
            heapq.heappush(ranks, (load + sum(sizes) * (rank == placed), rank))
    return bins if empty == 0 or not every_bin else None


def _micro_batch(b: _Bin, indices: List[int], padded: List[List[int]], seq_lengths,
                 multiple: int) -> MicroBatchPlan:
    """The plan of one filled bin: pairs in step order, segments chosen first, each row's
    segments in segment order."""
    positions = sorted(b.pairs)
    sides = len(padded[positions[0]])
    sizes = {(p, side): padded[p][side] for p in positions for side in range(sides)}
    # The micro-batch computes rows x its fullest row: besides the rows the bin was filled
    # with, try as few rows as the tokens need, spread evenly or filled in turn; keep the
    # layout that computes least.
    layouts = [b.row_of]
    for rows in range(math.ceil(b.load / b.shape.row_capacity), len(b.fill) + 1):
        for spread in (True, False):
            layouts.append(_rows_of(sizes, rows, b.shape.row_capacity, spread))
    row_of = min((layout for layout in layouts if layout is not None),
                 key=lambda layout: _computed_tokens(layout, sizes, multiple))
    offsets = [0] * (max(row_of.values()) + 1)
    placements = []
    for side in range(sides):
        for p in positions:
            row = row_of[(p, side)]
            placements.append((row, offsets[row], sizes[(p, side)]))
            offsets[row] += sizes[(p, side)]
    pairs = tuple(indices[p] for p in positions)
    real = sum(sum(seq_lengths[i]) for i in pairs)
    length = round_up(max(offsets), multiple)
    return MicroBatchPlan(pairs, len(offsets), length, real, tuple(placements))


def materialize(dataset: PreferenceDataset, plan: MicroBatchPlan, *, pad_id: int,
                chosen_only: bool = False) -> MicroBatch:
    """The tensors of one planned micro-batch (adadpo_megatron.micro_batch)."""

    indices = torch.tensor(plan.pairs, dtype=torch.long)
    if plan.placements is None:
        batch = collate(dataset, indices, chosen_only)
        if plan.length < batch["tokens"].shape[1]:
            batch = {k: (v[:, :plan.length].contiguous() if v.dim() == 2 else v)
                     for k, v in batch.items()}
    else:
        batch = _packed_tensors(dataset, plan, pad_id, sides=1 if chosen_only else 2)
    if plan.filler:
        batch["filler"] = True
    return batch


def _packed_tensors(dataset: PreferenceDataset, plan: MicroBatchPlan, pad_id: int,
                    sides: int) -> MicroBatch:
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
