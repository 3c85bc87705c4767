"""The micro-batch contract (adadpo_megatron/micro_batch.py) is checked where micro-batches
enter the forward step: a user's loader that leaves out a key, or hands rows of another
length, is told so by name before the model runs (issue 24, item 6)."""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron import LossConfig, PreferenceForwardStep
from adadpo_megatron.micro_batch import REQUIRED_KEYS, MicroBatch, check_micro_batch


def _batch() -> MicroBatch:
    tokens = torch.zeros(4, 8, dtype=torch.long)
    return {"tokens": tokens, "labels": tokens.clone(), "loss_mask": torch.ones(4, 8),
            "position_ids": torch.arange(8).expand(4, 8), "example_ids": torch.arange(2)}


def test_the_required_keys_are_the_row_keys():
    assert REQUIRED_KEYS == ("labels", "loss_mask", "position_ids", "tokens")
    check_micro_batch(_batch())


@pytest.mark.parametrize("key", REQUIRED_KEYS + ("example_ids",))
def test_a_missing_key_is_named_before_the_model_runs(key):
    batch = _batch()
    if key == "example_ids":  # required where it counts a packed batch's segments
        batch["segment_ids"] = torch.zeros(4, 8, dtype=torch.long)
    del batch[key]
    model = torch.nn.Linear(1, 1)  # never called: the check comes first
    with pytest.raises(ValueError, match=rf"the micro-batch has no '{key}'"):
        PreferenceForwardStep(LossConfig())(iter([batch]), model)


def test_rows_of_another_length_are_named():
    batch = _batch()
    batch["loss_mask"] = torch.ones(4, 7)
    with pytest.raises(ValueError, match=r"'loss_mask' do not have the shape of its tokens "
                                         r"\(4, 8\): \(4, 7\)"):
        check_micro_batch(batch)
