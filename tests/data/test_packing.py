"""Packed and longest-padded micro-batches: every pair once, whole, in place, balanced.

Oracles: the unpacked micro-batch of ``collate`` (each packed segment must be the same
tokens and labels), and invariants checked one pair and one row at a time.
"""

from __future__ import annotations

import json

import pytest
import torch

from adadpo_megatron.data.micro_batches import collate
from adadpo_megatron.data.packing import materialize, plan_step, round_up, step_token_counts
from adadpo_megatron.data.preference_data import IGNORE_INDEX, DataSettings, load_preference_data
from adadpo_megatron.data.tokenizers import ByteTokenizer

S = 64
PAD = ByteTokenizer.pad_id


def dataset(tmp_path, rows, seq_length=S):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _ = load_preference_data(str(path), ByteTokenizer(),
                                   DataSettings(seq_length=seq_length,
                                                max_prompt_length=seq_length // 2),
                                   cache=False)
    return data


def varied_rows(n=24, seed=0):
    """Pairs of very different lengths: short and long prompts and responses."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 28, (3,), generator=g))
        rows.append({"prompt": "p" * p, "chosen": "c" * c + str(i), "rejected": "r" * r})
    return rows


def lengths_by_hand(data, pair, side):
    labels = data.labels[pair, side].tolist()
    return max(t for t, label in enumerate(labels) if label != IGNORE_INDEX) + 1


def check_packed(data, plan, sides, multiple=1, length_multiple=1):
    """Every segment of a packed micro-batch is its unpacked sequence, in its own place, and
    the micro-batch is as long as its fullest row (rounded up), never longer than S."""
    for mb in plan:
        batch = materialize(data, mb, pad_id=PAD, chosen_only=sides == 1)
        m = len(mb.pairs)
        assert batch["tokens"].shape == (mb.rows, mb.length)
        assert batch["example_ids"].tolist() == [int(data.example_ids[i]) for i in mb.pairs]
        fullest = max(offset + size for _, offset, size in mb.placements)
        assert mb.length == min(S, round_up(fullest, length_multiple))
        owner = torch.full((mb.rows, mb.length), -1)
        unpacked = collate(data, torch.tensor(mb.pairs), chosen_only=sides == 1)
        for side in range(sides):
            for j, pair in enumerate(mb.pairs):
                segment = side * m + j
                n = lengths_by_hand(data, pair, side)
                row, offset, size = mb.placements[segment]
                assert size == round_up(n, multiple) and offset % multiple == 0
                assert (owner[row, offset:offset + size] == -1).all(), "segments overlap"
                owner[row, offset:offset + size] = segment
                row_of_unpacked = side * m + j
                torch.testing.assert_close(batch["tokens"][row, offset:offset + n],
                                           unpacked["tokens"][row_of_unpacked, :n])
                torch.testing.assert_close(batch["labels"][row, offset:offset + n],
                                           unpacked["labels"][row_of_unpacked, :n])
                assert batch["position_ids"][row, offset:offset + size].tolist() == \
                    list(range(size))
        assert torch.equal(batch["segment_ids"], owner)
        free = owner == -1
        assert (batch["labels"][free] == IGNORE_INDEX).all()
        assert (batch["tokens"][free] == PAD).all()
        assert torch.equal(batch["loss_mask"], (batch["labels"] != IGNORE_INDEX).float())
        assert batch["loss_mask"].sum() == unpacked["loss_mask"].sum()


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("sides", [2, 1], ids=["pairs", "sft"])
def test_every_pair_once_whole_and_balanced(tmp_path, dp_size, sides):
    data = dataset(tmp_path, varied_rows(30))
    indices = list(range(0, 30, 1))[:24]
    plan = plan_step(data.lengths, indices, mode="pack", dp_size=dp_size, micro_batch_size=2,
                     seq_length=S, sides=sides)
    assert len(plan) == dp_size
    assert len({len(rank) for rank in plan}) == 1, "every rank runs the same micro-batches"
    seen = sorted(i for rank in plan for mb in rank for i in mb.pairs)
    assert seen == sorted(indices)
    for rank in plan:
        check_packed(data, rank, sides)
    # Balance: the token loads of two ranks differ by at most one pair's tokens
    loads = [sum(mb.real_tokens for mb in rank) for rank in plan]
    largest_pair = max(int(data.lengths[i, :sides].sum()) for i in indices)
    assert max(loads) - min(loads) <= largest_pair
    again = plan_step(data.lengths, indices, mode="pack", dp_size=dp_size, micro_batch_size=2,
                      seq_length=S, sides=sides)
    assert again == plan, "a plan is a pure function of its inputs"


def test_a_pair_that_fills_a_row_and_a_pair_longer_than_a_row(tmp_path):
    # a sequence occupies BOS + prompt + response + EOS - 1 tokens: 31 + 33 = 64, a row's worth
    exact = {"prompt": "p" * 9, "chosen": "c" * 21, "rejected": "r" * 23}
    # 63 and 64 tokens: the pair needs two rows, and its rejected sequence fills one exactly
    long = {"prompt": "p" * 31, "chosen": "c" * 31, "rejected": "r" * 32}
    short = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data = dataset(tmp_path, [exact, long, short])
    assert data.lengths.tolist()[:2] == [[31, 33], [63, 64]]
    for rows_per_pair in (1, 2):  # micro-batches of 2 rows, and of 4
        plan = plan_step(data.lengths, [0, 1, 2], mode="pack", dp_size=1,
                         micro_batch_size=rows_per_pair, seq_length=S)
        check_packed(data, plan[0], sides=2)
        by_pair = {pair: (mb, j) for mb in plan[0] for j, pair in enumerate(mb.pairs)}
        mb, j = by_pair[1]
        m = len(mb.pairs)
        assert mb.placements[j][0] != mb.placements[m + j][0], "a longer pair takes two rows"
        assert mb.length == S, "its 64-token sequence fills a row exactly"


def test_segments_padded_to_the_context_parallel_multiple(tmp_path):
    data = dataset(tmp_path, varied_rows(12))
    plan = plan_step(data.lengths, range(12), mode="pack", dp_size=1, micro_batch_size=2,
                     seq_length=S, multiple=16, segment_multiple=4)
    check_packed(data, plan[0], sides=2, multiple=4, length_multiple=16)


def test_longest_cuts_each_micro_batch_to_its_longest_row(tmp_path):
    data = dataset(tmp_path, varied_rows(16))
    plan = plan_step(data.lengths, range(16), mode="longest", dp_size=2, micro_batch_size=2,
                     seq_length=S, multiple=8)
    for rank, block in zip(plan, (range(0, 8), range(8, 16)), strict=True):
        assert sorted(i for mb in rank for i in mb.pairs) == list(block)
        for mb in rank:
            batch = materialize(data, mb, pad_id=PAD)
            full = collate(data, torch.tensor(mb.pairs))
            longest = int(data.lengths[list(mb.pairs)].max())
            assert batch["tokens"].shape == (4, min(S, round_up(longest, 8)))
            assert torch.equal(full["labels"][:, batch["tokens"].shape[1]:],
                               torch.full_like(full["labels"][:, batch["tokens"].shape[1]:],
                                               IGNORE_INDEX)), "only padding was cut"
            torch.testing.assert_close(batch["tokens"], full["tokens"][:, :mb.length])


def test_real_token_share_counts_every_rank(tmp_path):
    data = dataset(tmp_path, varied_rows(16))
    real_total = int(data.lengths[:16].sum())
    for mode in ("none", "longest", "pack"):
        plan = plan_step(data.lengths, range(16), mode=mode, dp_size=2, micro_batch_size=2,
                         seq_length=S)
        real, computed = step_token_counts(plan)
        assert real == real_total
        assert computed == sum(materialize(data, mb, pad_id=PAD)["tokens"].numel()
                               for rank in plan for mb in rank)
    none = step_token_counts(plan_step(data.lengths, range(16), mode="none", dp_size=2,
                                       micro_batch_size=2, seq_length=S))
    assert none[1] == 16 * 2 * S


def test_a_bad_mode_names_the_key(tmp_path):
    data = dataset(tmp_path, varied_rows(2))
    with pytest.raises(ValueError, match="data.packing='tight' is not allowed"):
        plan_step(data.lengths, [0, 1], mode="tight", dp_size=1, micro_batch_size=1,
                  seq_length=S)
