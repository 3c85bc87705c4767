"""Packed micro-batches in megatron-core: the block-diagonal mask, the THD description and its
context-parallel split, and a real GPTModel on packed rows against the same sequences unpacked.

Oracles: loops written from the definitions (a token sees its own segment up to itself; a run
of one segment id never crosses a row; Transformer Engine's split gives rank r chunks r and
2 CP - 1 - r of every segment), the unsharded segment sums, and GPTModel on unpacked rows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from adadpo_megatron import sequence_logprobs, vocab_parallel_logprobs  # megatron-core groups
from adadpo_megatron.data.packing import materialize, plan_step
from adadpo_megatron.data.preference_data import DataSettings, load_preference_data
from adadpo_megatron.data.tokenizers import ByteTokenizer
from adadpo_megatron.mcore.packed_attention import (
    block_diagonal_causal_mask,
    thd_cu_seqlens,
    thd_flatten,
    thd_partition_index,
    thd_this_cp_rank,
)
from tests.data.test_packing import varied_rows
from tests.support.distributed import run_distributed

SEGMENTS = torch.tensor([[0, 0, 0, 2, 2, -1, -1, -1],
                         [1, 1, 1, 1, 3, 3, 3, 3],
                         [4, 4, 4, 4, 4, 4, 4, 4]])


def packed_batch(path, seq_length=64, multiple=1, micro_batch_size=3, pairs=12,
                 one_sequence=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(pairs)))
    data, _ = load_preference_data(str(path), ByteTokenizer(),
                                   DataSettings(seq_length=seq_length,
                                                max_prompt_length=seq_length // 2),
                                   cache=False)
    plan = plan_step(data.lengths, range(pairs), mode="pack", dp_size=1,
                     micro_batch_size=micro_batch_size, seq_length=seq_length,
                     multiple=multiple, segment_multiple=multiple, one_sequence=one_sequence)
    return data, plan[0]


def test_block_diagonal_mask_by_its_definition():
    mask = block_diagonal_causal_mask(SEGMENTS)
    rows, length = SEGMENTS.shape
    assert mask.shape == (rows, 1, length, length)
    for r in range(rows):
        for i in range(length):
            for j in range(length):
                sees = SEGMENTS[r, i] == SEGMENTS[r, j] and j <= i
                assert bool(mask[r, 0, i, j]) == (not sees), (r, i, j)
    assert (~mask).any(-1).all(), "every token sees at least itself"


def test_thd_runs_never_cross_a_row():
    cu = thd_cu_seqlens(SEGMENTS).tolist()
    runs, flat = [], SEGMENTS.reshape(-1).tolist()
    start = 0
    for t in range(1, len(flat) + 1):
        if t == len(flat) or t % SEGMENTS.shape[1] == 0 or flat[t] != flat[t - 1]:
            runs.append(t - start)
            start = t
    assert cu == [sum(runs[:k]) for k in range(len(runs) + 1)]
    assert runs == [3, 2, 3, 4, 4, 8]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_thd_split_gives_each_rank_its_two_chunks_of_every_segment(cp_size):
    lengths = [8, 16, 24, 8]
    cu = torch.tensor([0, 8, 24, 48, 56], dtype=torch.int32)
    everyone = []
    for rank in range(cp_size):
        index = thd_partition_index(cu, 56, cp_size, rank).tolist()
        expected, start = [], 0
        for n in lengths:
            chunk = n // (2 * cp_size)
            for part in (rank, 2 * cp_size - 1 - rank):
                expected += list(range(start + part * chunk, start + (part + 1) * chunk))
            start += n
        assert index == expected
        everyone += index
    assert sorted(everyone) == list(range(56)), "the ranks cover every token once"
    with pytest.raises(ValueError, match="not a multiple of 2 \\* context_parallel_size"):
        thd_partition_index(torch.tensor([0, 6], dtype=torch.int32), 6, 4, 0)


def _cp_worker(rank, world, tmp, one_sequence):
    import pathlib

    data, plan = packed_batch(pathlib.Path(tmp) / "pairs.jsonl", multiple=2 * world,
                              one_sequence=one_sequence)
    assert not one_sequence or plan[0].rows == 1
    batch = thd_flatten(materialize(data, plan[0], pad_id=ByteTokenizer.pad_id))
    segments = 2 * len(plan[0].pairs)
    total = batch["tokens"].shape[1]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, total, 300, generator=g, dtype=torch.float64).float()
    weights = torch.randn(segments, generator=g)

    def loss_of(sums, counts):  # any nonlinear function of whole-sequence statistics
        return ((sums / counts) * weights).exp().sum()

    full = logits.clone().requires_grad_()
    want = sequence_logprobs(vocab_parallel_logprobs(full, batch["labels"]), batch["loss_mask"],
                             segment_ids=batch["segment_ids"], num_segments=segments)
    loss_of(*want).backward()

    group = dist.group.WORLD
    mine = thd_this_cp_rank(batch, group)
    index = thd_partition_index(batch["cu_seqlens"], total, world, rank)
    local = logits[:, index].clone().requires_grad_()
    got = sequence_logprobs(vocab_parallel_logprobs(local, mine["labels"]), mine["loss_mask"],
                            segment_ids=mine["segment_ids"], num_segments=segments,
                            cp_group=group)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[1], want[1])
    loss_of(*got).backward()
    # every CP rank computes the loss from the same sums: each shard gets CP x its gradient,
    # which megatron-core's per-token normalisation divides back out
    torch.testing.assert_close(local.grad, world * full.grad[:, index], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("one_sequence", [False, True], ids=["rows", "one_thd_sequence"])
def test_cp2_segment_sums_of_sharded_packed_logits_match_unsharded(tmp_path, one_sequence):
    """Rows laid end to end (the mask layout's micro-batch) and the single sequence the
    planner makes for Transformer Engine's THD attention."""
    run_distributed(_cp_worker, 2, str(tmp_path), one_sequence)


def _model_worker(rank, world, tmp, position_embedding_type):
    import pathlib

    from adadpo_megatron.data.micro_batches import collate
    from adadpo_megatron.mcore.forward_step import _model_forward
    from adadpo_megatron.training.trainer import Trainer
    from tests.support.training import tiny_config

    data, plan = packed_batch(pathlib.Path(tmp) / "pairs.jsonl")
    config = tiny_config({"data.path": str(pathlib.Path(tmp) / "pairs.jsonl"),
                          "data.seq_length": 64, "data.max_prompt_length": 32,
                          "model.position_embedding_type": position_embedding_type})
    trainer = Trainer(config).setup()
    try:
        model = trainer.model[0].module
        model.eval()
        # scaled weights: logits far from uniform, so a wrong mask or position shows
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        mb = plan[0]
        packed = materialize(data, mb, pad_id=ByteTokenizer.pad_id)
        unpacked = collate(data, torch.tensor(mb.pairs))
        with torch.no_grad():
            packed_logps = vocab_parallel_logprobs(_model_forward(model, packed),
                                                   packed["labels"])
            rows_logps = vocab_parallel_logprobs(_model_forward(model, unpacked),
                                                 unpacked["labels"])
        m = len(mb.pairs)
        for segment, (row, offset, _) in enumerate(mb.placements):
            side, j = divmod(segment, m)
            n = int(data.lengths[mb.pairs[j], side])
            torch.testing.assert_close(packed_logps[row, offset:offset + n],
                                       rows_logps[side * m + j, :n], rtol=1e-4, atol=1e-4)
        assert (rows_logps.abs().sum(-1) > 1.0).all(), "the check is not vacuous"
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_gpt_model_on_packed_rows_equals_unpacked(tmp_path, position_embedding_type):
    """With RoPE megatron-core ignores position_ids (shift invariance makes that exact);
    learned positions read the restarted position_ids."""
    run_distributed(_model_worker, 1, str(tmp_path), position_embedding_type)


def test_a_packed_batch_without_a_packed_format_is_refused(tmp_path):
    """Guessing would let one segment attend to another without an error."""
    from adadpo_megatron import LossConfig, PreferenceForwardStep

    data, plan = packed_batch(tmp_path / "pairs.jsonl")
    batch = materialize(data, plan[0], pad_id=ByteTokenizer.pad_id)
    with pytest.raises(ValueError, match="needs the forward step's packed_format"):
        PreferenceForwardStep(LossConfig())(iter([batch]), torch.nn.Linear(1, 1))
