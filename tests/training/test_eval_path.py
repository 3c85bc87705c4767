"""data.eval_path: an evaluation set of its own, with each reference mode (issue 27, item 4).

Oracle: before any step the policy is the reference, so every held-out pair's loss is ln 2
exactly (float32's, to 1e-6) whatever the pairs, when, and only when, each evaluation pair
meets its own reference sums: the precomputed ones of data.eval_path's cache (its rows
overlap data.path's, so the training cache's sums would give other losses)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.training import DATA, tiny_config

pytestmark = pytest.mark.slow


def _worker(rank, world, eval_path, mode, out_path):
    from adadpo_megatron.training.precompute import precompute_reference
    from adadpo_megatron.training.trainer import Trainer

    config = tiny_config({"data.eval_path": eval_path, "reference.mode": mode,
                          "reference.cache_path": f"{out_path}.reference.pt"})
    if mode == "precompute":
        precompute_reference(config)
    trainer = Trainer(config).setup()
    try:
        metrics = trainer.evaluate()
        torch.save({"metrics": metrics, "train": len(trainer.run.data.train_set),
                    "eval": len(trainer.run.data.eval_set)}, out_path)
    finally:
        trainer.close()


@pytest.mark.parametrize("mode", ["resident", "precompute"])
def test_an_evaluation_set_of_its_own(tmp_path, mode):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[-12:]]
    # other texts than the training rows at the same row numbers
    rows = [{**row, "chosen": row["chosen"] + "!"} for row in rows]
    eval_path = tmp_path / "held_out.jsonl"
    eval_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_distributed(_worker, 1, str(eval_path), mode, str(tmp_path / "r.pt"))
    result = torch.load(tmp_path / "r.pt")
    assert (result["train"], result["eval"]) == (1000, 12)  # every data.path pair trains
    assert result["metrics"]["eval/pairs"] == 12
    assert result["metrics"]["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    if mode == "precompute":
        assert (tmp_path / "r.pt.reference.eval.pt").is_file()


def test_eval_path_and_eval_fraction_are_one_or_the_other():
    with pytest.raises(ValueError, match="data.eval_path='x.jsonl' and data.eval_fraction=0.1 "
                                         "are both set"):
        tiny_config({"data.eval_path": "x.jsonl", "data.eval_fraction": 0.1})
    with pytest.raises(ValueError, match="data.eval_split='test' is the split of "
                                         "data.eval_path, which is not set"):
        tiny_config({"data.eval_split": "test"})
