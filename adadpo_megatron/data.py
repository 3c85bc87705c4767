"""Preference pairs: reading, tokenising, and the micro-batches megatron's schedule consumes.

A micro-batch of ``m`` pairs is a dict of tensors with 2m rows, the m chosen sequences first
and the m rejected ones second (pair i = rows i and i + m):

    tokens        [2m, S] long   input ids, padded with the tokenizer's pad id
    labels        [2m, S] long   next-token ids on response tokens, -100 elsewhere
    loss_mask     [2m, S] float  1 on response tokens (labels != -100)
    position_ids  [2m, S] long
    example_ids   [m]     long   the pair's row in the data file (0-based)
    ref_logps     [2m]    float  reference sums, when precomputed

Truncation: a prompt keeps its last ``max_prompt_length`` tokens; a response is cut so that
BOS + prompt + response + EOS fits ``seq_length + 1`` tokens (the inputs and the shifted
labels each have ``seq_length``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import torch

IGNORE_INDEX = -100
Batch = Dict[str, torch.Tensor]


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus pad, bos and eos. For demos and tests."""

    name = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"byte-v1-vocab{self.vocab_size}"


@dataclass
class PreferenceDataset:
    """Tokenised pairs: tokens and labels [N, 2, S] (chosen, rejected), example ids [N]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    example_ids: torch.Tensor
    source: str
    content_hash: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, indices: torch.Tensor) -> PreferenceDataset:
        """The pairs at ``indices``, keeping their example ids (rows of the data file)."""
        return PreferenceDataset(self.tokens[indices], self.labels[indices],
                                 self.example_ids[indices], self.source, self.content_hash)


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


def _read_jsonl(path: Path) -> Iterator[tuple]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object with prompt, "
                                 f"chosen and rejected, got {type(row).__name__}")
            yield line_number, row


def _validated_fields(path: Path, line_number: int, row: dict) -> tuple:
    values = []
    for name in ("prompt", "chosen", "rejected"):
        if name not in row:
            raise ValueError(f"{path}:{line_number}: missing field {name!r} "
                             f"(fields present: {', '.join(sorted(row)) or 'none'})")
        if not isinstance(row[name], str):
            raise ValueError(f"{path}:{line_number}: field {name!r} must be a string, got "
                             f"{type(row[name]).__name__}")
        values.append(row[name])
    prompt, chosen, rejected = values
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise ValueError(f"{path}:{line_number}: field {name!r} is empty; a response "
                             "needs at least one token")
    if chosen == rejected:
        raise ValueError(f"{path}:{line_number}: fields 'chosen' and 'rejected' are identical;"
                         " such a pair carries no preference")
    return prompt, chosen, rejected


def _sequence(tokenizer, prompt_ids, response_ids, seq_length, max_prompt_length):
    """(tokens [S], labels [S]) for one prompt + response."""
    prompt_ids = [tokenizer.bos_id] + prompt_ids[-max_prompt_length:]
    room = seq_length + 1 - len(prompt_ids)
    response_ids = (response_ids + [tokenizer.eos_id])[:room]
    full = prompt_ids + response_ids
    tokens = torch.full((seq_length,), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    tokens[: len(full) - 1] = torch.tensor(full[:-1])
    # label t is the token read at t + 1; only response tokens are scored
    start = len(prompt_ids) - 1
    labels[start: len(full) - 1] = torch.tensor(response_ids)
    return tokens, labels


def load_jsonl_pairs(path, tokenizer, seq_length: int, max_prompt_length: int
                     ) -> PreferenceDataset:
    """Reads and tokenises a JSON Lines file of {"prompt", "chosen", "rejected"} strings.

    Raises:
        ValueError: naming the file, line and field of the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    tokens, labels, ids = [], [], []
    for line_number, row in _read_jsonl(path):
        prompt, chosen, rejected = _validated_fields(path, line_number, row)
        prompt_ids = tokenizer.encode(prompt)
        pair = [_sequence(tokenizer, prompt_ids, tokenizer.encode(r), seq_length,
                          max_prompt_length) for r in (chosen, rejected)]
        tokens.append(torch.stack([pair[0][0], pair[1][0]]))
        labels.append(torch.stack([pair[0][1], pair[1][1]]))
        ids.append(len(ids))
    if not ids:
        raise ValueError(f"{path}: no pairs found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return PreferenceDataset(torch.stack(tokens), torch.stack(labels), torch.tensor(ids),
                             str(path), digest)


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
            ) -> Batch:
    """One micro-batch of pairs ``indices`` in the layout of the module docstring.

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


def held_out_micro_batches(dataset: PreferenceDataset, *, micro_batch_size: int,
                           dp_rank: int, dp_size: int, chosen_only: bool = False
                           ) -> List[Batch]:
    """This data-parallel rank's micro-batches covering every held-out pair exactly once.

    Rank r takes the r-th of dp_size contiguous blocks (their sizes differ by at most one
    pair); its last micro-batch may hold fewer than micro_batch_size pairs. So the held-out
    metrics are the same on every layout.
    """
    mine = torch.tensor_split(torch.arange(len(dataset)), dp_size)[dp_rank]
    return [collate(dataset, mine[i: i + micro_batch_size], chosen_only)
            for i in range(0, len(mine), micro_batch_size)]


def step_micro_batches(dataset: PreferenceDataset, step: int, *, global_batch_size: int,
                       micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       chosen_only: bool = False) -> List[Batch]:
    """This data-parallel rank's micro-batches for one optimizer step.

    Rank r takes the r-th contiguous block of the global batch; a pair is never split.
    """
    indices = global_batch_indices(step, len(dataset), global_batch_size, seed)
    per_rank = global_batch_size // dp_size
    mine = indices[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    return [collate(dataset, mine[i: i + micro_batch_size], chosen_only)
            for i in range(0, per_rank, micro_batch_size)]
