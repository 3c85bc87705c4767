"""adadpo-train end to end under torchrun, and its config errors before any model is built."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tolerances import dpo_loss_gap, forward_depth, logp_sum_gap
from tests.support.training import REPO, free_port

CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
STEPS = 6


def _train(tmp_path, name, nproc, *overrides):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "adadpo_megatron", "--config", CONFIG,
           f"train.output_dir={out}", f"train.max_steps={STEPS}", "data.eval_fraction=0.1",
           "train.eval_interval=3", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    _train(tmp, "single", 1)
    return tmp / "single"


@pytest.fixture(scope="module")
def single_run(single_run_dir):
    lines = (single_run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("overrides", [
    ("parallel.tensor_model_parallel_size=2",),
    ("parallel.pipeline_model_parallel_size=2",),
    (),
], ids=["tp2", "pp2", "dp2"])
@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(single_run, tmp_path, overrides):
    runs = _train(tmp_path, "two", 2, *overrides)
    assert len(runs) == len(single_run) == STEPS
    for got, want in zip(runs, single_run, strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got.keys() == want.keys()
        for key in (k for k in want if k.startswith("eval/")):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_plots_and_tensorboard(single_run_dir, tmp_path):
    run_dir = single_run_dir
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from adadpo_megatron.training.reporting.plots import main

    main([str(run_dir), "--out", str(tmp_path / "plots")])
    for name in ("loss", "rewards", "accuracy", "coefficient"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_metrics_jsonl_has_the_documented_fields(single_run):
    expected = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "logps_mean/chosen",
                "logps_mean/rejected", "nll/chosen", "adadpo/coef_mean", "adadpo/coef_max",
                "adadpo/clip_fraction", "adadpo/grad_ratio", "pairs", "tokens", "grad_norm",
                "learning_rate", "tokens_per_second", "data/real_token_fraction"}
    for line in single_run:
        assert expected <= set(line), expected - set(line)
        assert line["pairs"] == 16
        assert 0 < line["data/real_token_fraction"] <= 1
    evaluated = [line["step"] for line in single_run if "eval/loss" in line]
    assert evaluated == [2, 5]
    # 100 held-out pairs (10% of 1000) in micro-batches of 4: all of them, once
    assert single_run[2]["eval/pairs"] == 100
    assert single_run[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    # 10% warm-up of 6 steps rounds to none; then cosine from lr 1e-3 towards min_lr 1e-4
    rates = [line["learning_rate"] for line in single_run]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] > 1e-4


@pytest.mark.parametrize("world,overrides,message", [
    ("3", ["parallel.tensor_model_parallel_size=2"],
     r"WORLD_SIZE\(3\) is not divisible by parallel.tensor_model_parallel_size\(2\)"),
    ("1", ["train.global_batch_size=10"],
     r"train.global_batch_size\(10\) is not divisible by train.micro_batch_size\(4\) \* "
     r"data-parallel size\(1\) = 4"),
    ("1", ["train.bogus=1"], r"unknown key train.bogus"),
    ("1", ["model.hidden_sise=3"], r"unknown key\(s\) model.hidden_sise"),
    ("1", ["parallel.pipeline_model_parallel_size=3"],
     r"model.num_layers\(4\) is not divisible by parallel.pipeline_model_parallel_size\(3\)"),
    ("1", ["loss.loss_type=simpo"], r"'simpo' is reference-free; set reference.mode=none"),
    ("1", ["loss.beta=-1"], r"loss.beta=-1 is out of range"),
    ("2", ["parallel.context_parallel_size=2", "data.seq_length=30"],
     r"data.seq_length\(30\) is not divisible by 2 \* parallel.context_parallel_size\(2\)"),
    ("2", ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"],
     r"parallel.sequence_parallel=true needs Transformer Engine or Apex norms"),
])
def test_config_errors_name_the_key_and_numbers(monkeypatch, capsys, world, overrides, message):
    from adadpo_megatron.training.cli import train_main

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", CONFIG, *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tiny_cpu.yaml" in err or "WORLD_SIZE" in err
    import re

    assert re.search(message, err), err


@pytest.mark.slow
def test_precompute_command_then_train(tmp_path):
    cache = tmp_path / "pairs.reference.pt"
    common = ["--config", CONFIG, "reference.mode=precompute", f"reference.cache_path={cache}",
              f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    for command in (["precompute-reference"], []):
        result = subprocess.run([sys.executable, "-m", "adadpo_megatron", *command, *common],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "MASTER_PORT": str(free_port())})
        assert result.returncode == 0, result.stderr[-3000:]
    assert cache.is_file()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # the cache's sums come from padded rows, the packed policy's round apart from them
    # (tests/support/tolerances.py: the tiny preset, seq_length 32): z by beta (C + 1) times
    # a sum's gap, the loss from ln 2 by half that; a misaligned cache is off by nats
    depth = forward_depth(4, 64, 128, 32, 384)
    sums = {side: logp_sum_gap(line[f"logps/{side}"], 32, depth) for side in ("chosen", "rejected")}
    bound = dpo_loss_gap(0.1, sums["chosen"], sums["rejected"], reference=False, clip=2.0,
                         loss=math.log(2.0), log_ratio=0.0)
    assert line["loss"] == pytest.approx(0.6931471805599453, abs=bound)


@pytest.mark.slow
def test_a_run_writes_its_effective_config(single_run_dir):
    """output_dir/config.yaml: the run's config (tiny_cpu.yaml with the run's overrides) as
    --print-config prints it, and it reads back to the same config."""
    from adadpo_megatron.training.config_help import effective_yaml
    from adadpo_megatron.training.run_config import load_run_config, to_dict

    written = single_run_dir / "config.yaml"
    want = load_run_config(CONFIG, [f"train.output_dir={single_run_dir}",
                                    f"train.max_steps={STEPS}", "data.eval_fraction=0.1",
                                    "train.eval_interval=3"])
    assert written.read_text() == effective_yaml(want)
    assert to_dict(load_run_config(str(written))) == to_dict(want)


def test_print_config_prints_the_effective_config_and_help_lists_every_key(capsys, tmp_path):
    """--print-config: the YAML of the config with its overrides, defaults filled in, which
    load_run_config reads back to the same config; --help: every key of every section with
    its default and the first sentence of its docstring entry."""
    import dataclasses

    import yaml

    from adadpo_megatron.training.cli import train_main
    from adadpo_megatron.training.config_help import (
        SECTION_CLASSES,
        effective_yaml,
        field_descriptions,
    )
    from adadpo_megatron.training.run_config import NESTED, load_run_config, to_dict

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", CONFIG, "--print-config", "loss.beta=0.25",
                    "optimizer.adam_eps=1e-6"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# the effective config of ")
    values = yaml.safe_load(printed)
    assert values["loss"]["beta"] == 0.25 and values["optimizer"]["adam_eps"] == 1e-6
    assert values["train"]["keep_checkpoints"] == 2  # a default the file does not set
    want = load_run_config(CONFIG, ["loss.beta=0.25", "optimizer.adam_eps=1e-6"])
    # read back from elsewhere: its one relative path (data.path) made absolute, as the
    # header says it is relative to the working directory
    assert f"relative to the working directory, here {Path.cwd()}" in printed
    values["data"]["path"] = str(want.resolve(values["data"]["path"]))
    want.data.path = values["data"]["path"]
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    assert to_dict(load_run_config(str(tmp_path / "printed.yaml"))) == to_dict(want)
    # train.num_epochs: max_steps is derived at start, so the file leaves it unset
    epochs = load_run_config(CONFIG, ["train.max_steps=null", "train.num_epochs=2"])
    epochs.train.max_steps = 63  # as setup_run derives it
    (tmp_path / "epochs.yaml").write_text(effective_yaml(epochs).replace(
        str(values["data"]["path"]), values["data"]["path"]))
    assert yaml.safe_load((tmp_path / "epochs.yaml").read_text())["train"]["max_steps"] is None
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    for section, cls in SECTION_CLASSES.items():
        docs = field_descriptions(cls)
        for f in dataclasses.fields(cls):
            if f.name != NESTED.get(section):
                assert docs.get(f.name), f"{section}.{f.name} has no docstring entry"
                assert f"    {f.name} = " in text and docs[f.name] in text, f.name


def test_quiet_silences_the_known_notices_and_nothing_else(caplog):
    import logging
    import warnings

    from adadpo_megatron.training.notices import quiet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning,
                      stacklevel=1)
        warnings.warn("MimoModelConfig is experimental and still under active development.",
                      UserWarning, stacklevel=1)
        warnings.warn("a warning nobody has seen yet", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning nobody has seen yet"]
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting ...")
        logger.warning("something else from GPTModel")
    assert [r.getMessage() for r in caplog.records] == ["something else from GPTModel"]


@pytest.mark.slow
def test_a_run_says_what_is_missing_once_and_nothing_else(tmp_path):
    """adadpo-train's start-up on a machine without Transformer Engine and Apex: one line
    instead of megatron-core's dozen notices (issue 27, item 8)."""
    from adadpo_megatron.training.notices import KNOWN_LOG_MESSAGES

    result = subprocess.run(
        [sys.executable, "-m", "adadpo_megatron", "--config", CONFIG, "train.max_steps=1",
         f"train.output_dir={tmp_path / 'run'}", "train.progress=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    noise = ["Warning", "warnings.warn", *KNOWN_LOG_MESSAGES.values()]
    assert not [line for line in result.stderr.splitlines()
                if any(word in line for word in noise)], result.stderr
    import torch

    from adadpo_megatron.training.notices import environment_line

    line = environment_line(torch.cuda.is_available())  # None where both are installed
    assert result.stdout.count(line) == 1 if line else True, result.stdout


@pytest.mark.slow
def test_a_finished_run_run_again_says_so_and_how_to_go_on(single_run_dir, tmp_path):
    import shutil

    run = tmp_path / "finished"
    shutil.copytree(single_run_dir, run)
    before = (run / "metrics.jsonl").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "adadpo_megatron", "--config", CONFIG, f"train.output_dir={run}",
         f"train.max_steps={STEPS}", "data.eval_fraction=0.1", "train.eval_interval=3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"this run is finished: {run}'s checkpoint is at step {STEPS}" in result.stderr
    assert "raise it" in result.stderr and "train.output_dir" in result.stderr
    assert (run / "metrics.jsonl").read_text() == before
