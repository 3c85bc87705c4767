"""Weights & Biases (train.wandb), offline: what the run wrote to W&B's own transaction log
(the file ``wandb sync`` uploads), read back record by record (tests/support/wandb_records.py),
against the run's metrics.jsonl and effective config (issue 27, item 5)."""

from __future__ import annotations

import json

import pytest

from tests.support import wandb_records
from tests.support.distributed import run_distributed
from tests.support.training import tiny_config

pytestmark = pytest.mark.slow

WANDB = {"project": "adadpo-test", "mode": "offline"}


def _worker(rank, world, out_dir, max_steps):
    import os

    from adadpo_megatron.training.trainer import Trainer

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[name] = os.path.join(out_dir, "wandb-home")  # nothing outside the test
    os.environ["WANDB_SILENT"] = "true"
    trainer = Trainer(tiny_config({"train.output_dir": out_dir, "train.max_steps": max_steps,
                                   "train.wandb": WANDB, "data.eval_fraction": 0.005,
                                   "train.eval_interval": 2})).setup()
    try:
        trainer.train()
    finally:
        trainer.close()


def test_metrics_and_config_reach_wandb_and_a_resumed_run_continues_it(tmp_path):
    from adadpo_megatron.training.config_help import effective_config

    run = tmp_path / "run"
    run_distributed(_worker, 1, str(run), 2)
    run_distributed(_worker, 1, str(run), 3)  # resumes at step 2 (train.max_steps raised)
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2, logs
    ids = {wandb_records.run_id(log) for log in logs}
    assert ids == {(run / "wandb_run_id").read_text().strip()}, "one W&B run, continued"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [step for log in logs for step in wandb_records.history(log)]
    assert [s["_step"] for s in logged] == [m["step"] for m in metrics] == [0, 1, 2]
    for step, line in zip(logged, metrics, strict=True):
        for key, value in line.items():
            if key != "step":
                assert step[key] == pytest.approx(value, rel=1e-12), key
    assert "eval/loss" in logged[1]  # the evaluation after step 1, at its step
    want = effective_config(tiny_config({"train.output_dir": str(run), "train.max_steps": 3,
                                         "train.wandb": WANDB, "data.eval_fraction": 0.005,
                                         "train.eval_interval": 2}))
    got = wandb_records.config(logs[1])
    for section, values in want.items():
        assert got[section] == json.loads(json.dumps(values)), section


def test_wandb_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="train.wandb=.* must be a mapping with at least a "
                                         "project"):
        tiny_config({"train.wandb": {"mode": "offline"}})
    with pytest.raises(ValueError, match="unknown key.*train.wandb.projekt"):
        tiny_config({"train.wandb": {"project": "p", "projekt": "q"}})
    with pytest.raises(ValueError, match="train.wandb.mode='of' is not allowed"):
        tiny_config({"train.wandb": {"project": "p", "mode": "of"}})
