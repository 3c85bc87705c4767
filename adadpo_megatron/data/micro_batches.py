"""Preference pairs as the micro-batches megatron's schedule consumes, and the sampler.

The micro-batch layout (chosen sequences first, keys and shapes) is defined once, in
``adadpo_megatron.micro_batch``. Reading, validation, tokenisation and truncation are in
``adadpo_megatron.data.preference_data``; packing in ``adadpo_megatron.data.packing``.
"""

from __future__ import annotations

from typing import List

import torch

from adadpo_megatron.data.preference_data import IGNORE_INDEX, PreferenceDataset
from adadpo_megatron.micro_batch import MicroBatch


def split_held_out(dataset: PreferenceDataset, fraction: float, seed: int):
    """(train, held-out) subsets: a seeded random ``fraction`` of the pairs is held out."""
    if fraction <= 0:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(fraction * len(dataset))))
    if held >= len(dataset):
        raise ValueError(f"data.eval_fraction={fraction} leaves no training pairs out of "
                         f"{len(dataset)}")
    return dataset.subset(order[held:].sort().values), dataset.subset(order[:held].sort().values)



class PairDataset(torch.utils.data.Dataset):
    """One pair per item, for data loaders that collate samples themselves (Megatron-LM's
    pretrain()): {"tokens", "labels", "loss_mask", "position_ids": [2, S], "example_ids": [],
    "ref_logps": [2] when given}. The forward step turns the stacked [m, 2, S] batch into the
    chosen-first layout."""

    def __init__(self, dataset: PreferenceDataset, ref_logps: torch.Tensor | None = None):
        self.dataset, self.ref_logps = dataset, ref_logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> MicroBatch:
        labels = self.dataset.labels[index]
        item = {"tokens": self.dataset.tokens[index], "labels": labels,
                "loss_mask": (labels != IGNORE_INDEX).float(),
                "position_ids": torch.arange(labels.shape[-1]).expand_as(labels).contiguous(),
                "example_ids": self.dataset.example_ids[index]}
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[self.dataset.example_ids[index]]
        return item


def global_batch_indices(step: int, num_examples: int, global_batch_size: int,
                         seed: int) -> torch.Tensor:
    """The example indices of optimizer step ``step`` ([global_batch_size]).

    Epochs are independent permutations seeded by (seed, epoch); a global batch may span the
    end of one epoch and the start of the next. Deterministic for a given seed.
    """
    start = step * global_batch_size
    out = []
    while len(out) < global_batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        order = torch.randperm(num_examples,
                               generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(order[offset: offset + global_batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def collate(dataset: PreferenceDataset, indices: torch.Tensor, chosen_only: bool = False
            ) -> MicroBatch:
    """One micro-batch (rows) of the pairs ``indices`` (adadpo_megatron.micro_batch).

    ``chosen_only`` keeps the m chosen rows alone (supervised warm-up on the chosen responses).
    """
    sides = (0,) if chosen_only else (0, 1)
    tokens = torch.cat([dataset.tokens[indices, side] for side in sides])
    labels = torch.cat([dataset.labels[indices, side] for side in sides])
    seq_length = tokens.shape[1]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand_as(tokens).contiguous(),
        "example_ids": dataset.example_ids[indices],
    }


def step_micro_batches(dataset: PreferenceDataset, step: int, *, global_batch_size: int,
                       micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       chosen_only: bool = False) -> List[MicroBatch]:
    """This data-parallel rank's padded micro-batches for one optimizer step, for loops built
    by hand (examples/megatron_loop.py); the trainer plans every layout with
    adadpo_megatron.data.packing.

    Rank r takes the r-th contiguous block of the global batch; a pair is never split.
    """
    indices = global_batch_indices(step, len(dataset), global_batch_size, seed)
    per_rank = global_batch_size // dp_size
    mine = indices[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    return [collate(dataset, mine[i: i + micro_batch_size], chosen_only)
            for i in range(0, per_rank, micro_batch_size)]
