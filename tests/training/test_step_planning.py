"""Every step and every evaluation of an accepted config plans (issue 23, item 9).

A config the run-config check accepts must never fail to plan a training step mid-run, and an
evaluation must plan whatever the held-out set's size: the planner either finds micro-batches
for every pair (a multiple of the pipeline size per rank under the interleaved schedule, the
same count on every data-parallel rank) or the check refuses the config before anything is
built. Drawn at random: global batch, micro-batch size, DP, PP, VPP, token budget, packing
mode, THD or rows, SFT or pairs, seed and the distribution of lengths; planned exactly as the
trainer plans (``plan_micro_batches``).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from adadpo_megatron.data.micro_batches import global_batch_indices
from adadpo_megatron.training.layout import ParallelLayout
from adadpo_megatron.training.run import plan_micro_batches
from tests.support.training import tiny_config

N = 240  # pairs in the data set


def _lengths(kind: str, seq_length: int, rng: random.Random) -> torch.Tensor:
    """[N, 2] sequence lengths: long-tailed, all at the maximum, or half tiny, half maximal."""
    if kind == "max":
        return torch.full((N, 2), seq_length)
    if kind == "bimodal":
        return torch.tensor([[seq_length] * 2 if rng.random() < 0.5 else [2, 3]
                             for _ in range(N)])
    return torch.tensor([[min(seq_length, max(1, int(rng.lognormvariate(math.log(seq_length / 3),
                                                                         0.8))))
                          for _ in range(2)] for _ in range(N)])


def _draw(rng: random.Random):
    pp = rng.choice([1, 2, 4])
    vpp = rng.choice([None, 2, 2]) if pp > 1 else None
    dp = rng.choice([1, 2, 3])
    seq_length = rng.choice([32, 64])
    packing = rng.choice(["none", "longest", "pack"])
    sft = rng.random() < 0.25
    sides = 1 if sft else 2
    overrides = {
        "model.num_layers": 8, "parallel.pipeline_model_parallel_size": pp,
        "parallel.virtual_pipeline_model_parallel_size": vpp, "data.seq_length": seq_length,
        "data.packing": packing, "train.global_batch_size": rng.randint(1, 40),
        "train.micro_batch_size": rng.choice([1, 2, 3, 4]), "train.seed": rng.randint(0, 99)}
    if packing == "pack" and rng.random() < 0.5:
        overrides["data.max_tokens_per_micro_batch"] = sides * seq_length * rng.choice([1, 2, 3])
    if sft:
        overrides.update({"train.stage": "sft", "reference.mode": "none"})
    return overrides, dp * pp


def _check(plan, indices, config, layout, *, evaluation):
    counts = {len(rank) for rank in plan}
    assert len(plan) == layout.dp and len(counts) == 1, f"ranks differ: {counts}"
    assert counts.pop() % layout.micro_batch_multiple == 0
    real = [mb for rank in plan for mb in rank if not mb.filler]
    assert Counter(i for mb in real for i in mb.pairs) == Counter(int(i) for i in indices), \
        "every pair once, in a real micro-batch"
    assert all(mb.pairs for rank in plan for mb in rank), "a micro-batch without a pair"
    fillers = [mb for rank in plan for mb in rank if mb.filler]
    assert evaluation or not fillers, "a training step with fillers"
    assert all(mb.real_tokens == 0 for mb in fillers)
    if config.data.packing == "pack":
        assert all(mb.rows * mb.length <= config.micro_batch_tokens()
                   for rank in plan for mb in rank)


@pytest.mark.parametrize("seed", range(6))
def test_accepted_configs_plan_every_step_and_every_evaluation(seed):
    rng = random.Random(seed)
    accepted = refused = interleaved_packed = 0
    while accepted < 40:
        overrides, world = _draw(rng)
        try:
            config = tiny_config(overrides)
            layout = ParallelLayout.of(config, world)
        except ValueError:
            refused += 1
            continue
        accepted += 1
        interleaved_packed += bool(layout.vpp and config.data.packing == "pack")
        lengths = _lengths(rng.choice(["tailed", "max", "bimodal"]), config.data.seq_length, rng)
        thd = rng.random() < 0.5
        t = config.train
        for step in range(4):
            indices = global_batch_indices(step, N, t.global_batch_size, t.seed)
            _check(plan_micro_batches(config, layout, lengths, indices, thd=thd),
                   indices, config, layout, evaluation=False)
        for size in (1, rng.randint(1, 60)):
            indices = torch.randperm(N, generator=torch.Generator().manual_seed(size))[:size]
            _check(plan_micro_batches(config, layout, lengths, indices, thd=thd, fill=True),
                   indices, config, layout, evaluation=True)
    assert refused > 0 and interleaved_packed > 0, (refused, interleaved_packed)


def test_the_issues_failing_config_is_refused_up_front():
    """Issue 23: global batch 11, micro-batch 1, 64-token budget, PP 2 x VPP 2 was accepted,
    then failed at step 12 ("cannot pack 11 pairs into 10 micro-batches") and on every
    resume."""
    config = tiny_config({"model.num_layers": 4, "parallel.pipeline_model_parallel_size": 2,
                          "parallel.virtual_pipeline_model_parallel_size": 2,
                          "train.global_batch_size": 11, "train.micro_batch_size": 1,
                          "data.seq_length": 32, "data.max_tokens_per_micro_batch": 64,
                          "train.seed": 22})
    with pytest.raises(ValueError, match=r"train.global_batch_size\(11\) is not divisible by "
                                         r"data-parallel size\(1\) \* parallel.pipeline_model_"
                                         r"parallel_size\(2\) = 2"):
        ParallelLayout.of(config, 2)
