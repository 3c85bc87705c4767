"""AdaDPO inside Megatron-LM's own pretrain() (adadpo_megatron.integrations.megatron_lm), run
for real on CPU over gloo and held against adadpo-train on the same model, data, seed and
micro-batches.

The oracle is adadpo-train's single-process run (itself proven equal to every TP/PP/VPP/DP
layout in tests/training/test_cli.py); the tolerances are tests/support/tolerances.py's
float32 bounds for two computations of one TINY run (SGD, so that "the same weights after a
step" is a statement about the gradients), from the oracle's own metrics. Each is also held to
the issue's 1e-5 relative, the tighter of the two after step 0: the largest difference measured
(this machine, the three layouts below) was 5.7e-7 relative (TP 2's gradient norm at
step 3), against derived bounds of 1e-6 (step-0 loss) to 4e-3 relative.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.support.commands import command_env, one_error_line, run_command
from tests.support.training import DATA, REPO, TINY, tiny_training_gaps

STEPS = 3
JOB = REPO / "tests" / "integrations" / "megatron_lm_job.py"
PROG = "adadpo_megatron.integrations.megatron_lm"
PRECOMPUTE = [sys.executable, "-c", "import sys; from adadpo_megatron.training.cli import "
              "precompute_main; precompute_main(sys.argv[1:])"]
TRAIN = [sys.executable, "-m", "adadpo_megatron"]
EXPORT = [sys.executable, "-m", "adadpo_megatron", "export-hf"]
SEQ = TINY["data"]["seq_length"]


def _run_config(tmp_path):
    """TINY with a precomputed reference and held-out pairs, as a run config file."""
    m, o, t = TINY["model"], TINY["optimizer"], TINY["train"]
    config = {
        "model": dict(m),
        "loss": {"loss_type": "dpo", "beta": TINY["loss"]["beta"], "adaptive": True,
                 "clip": 2.0},
        "data": {"path": str(DATA), "tokenizer": "byte", "seq_length": SEQ,
                 "eval_fraction": 0.1},
        "reference": {"mode": "precompute", "cache_path": str(tmp_path / "reference.pt")},
        "optimizer": {**o, "weight_decay": 0.0, "lr_warmup_fraction": 0.0,
                      "lr_decay_style": "constant"},
        "train": {**t, "max_steps": STEPS, "output_dir": str(tmp_path / "adadpo-train"),
                  "save_interval": 2, "keep_checkpoints": 3},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def megatron_lm_flags(config_path, *extra):
    """The Megatron-LM flags of TINY's model, optimizer and batches, plus this plugin's."""
    m, o, t = TINY["model"], TINY["optimizer"], TINY["train"]
    return [
        "--num-layers", m["num_layers"], "--hidden-size", m["hidden_size"],
        "--num-attention-heads", m["num_attention_heads"], "--group-query-attention",
        "--num-query-groups", m["num_query_groups"], "--ffn-hidden-size", m["ffn_hidden_size"],
        # the tiny preset: RMSNorm, SwiGLU, no biases, RoPE, untied embeddings, std 0.02
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--init-method-std", "0.02", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seq-length", SEQ, "--max-position-embeddings", SEQ,
        "--micro-batch-size", t["micro_batch_size"], "--global-batch-size",
        t["global_batch_size"], "--train-iters", STEPS, "--seed", t["seed"],
        "--optimizer", "sgd", "--sgd-momentum", "0", "--lr", o["lr"], "--weight-decay", "0",
        "--clip-grad", o["clip_grad"], "--lr-decay-style", "constant",
        # the byte tokenizer's 259 ids, padded to 384 as adadpo-train pads them
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "259",
        # CPU: megatron-core's local layers, no fused kernels, gloo
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
        "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
        "--no-rope-fusion", "--no-persist-layer-norm", "--distributed-backend", "gloo",
        "--log-interval", "1", "--eval-interval", "2",
        "--calculate-per-token-loss", "--adadpo-config", config_path, *extra]


def _pretrain(tmp_path, name, config_path, *extra, nproc=2):
    """The job under torchrun; what its train_step returned each iteration."""
    record = tmp_path / f"{name}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(JOB),
               *[str(f) for f in megatron_lm_flags(config_path, *extra)]]
    # Megatron-LM requires it with tensor parallelism before Blackwell (its launch scripts set it)
    env = command_env(ADADPO_RECORD=str(record), CUDA_DEVICE_MAX_CONNECTIONS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(run config path, adadpo-train's metrics of STEPS steps); its reference precomputed,
    checkpoints at steps 2 and 3."""
    tmp = tmp_path_factory.mktemp("megatron_lm")
    config = _run_config(tmp)
    for command in (PRECOMPUTE, TRAIN):
        result = run_command([*command, "--config", config])
        assert result.returncode == 0, result.stderr[-4000:]
    metrics = (tmp / "adadpo-train" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in metrics]
    return config, [m for m in history if "loss" in m]


def _assert_matches(records, oracle_history, first_step=0, last_step=STEPS):
    """Each record (one Megatron-LM iteration, steps first_step + 1 .. last_step) has the
    oracle's loss and gradient norm."""
    steps, _ = tiny_training_gaps(oracle_history, SEQ)
    for record in records:
        step = record["iteration"] - 1
        want, gaps = oracle_history[step], steps[step]
        assert record["skipped"] == 0
        for key in ("loss", "grad_norm"):
            got, expected = record[key], want[key]
            assert abs(got - expected) <= gaps[key], (step, key, got, expected, gaps[key])
            assert abs(got - expected) <= 1e-5 * abs(expected), (step, key, got, expected)
    assert [r["iteration"] for r in records] == list(range(first_step + 1, last_step + 1))


LAYOUTS = {
    # (Megatron-LM flags, data.packing)
    "tp2": (["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64",
             "--eval-iters", "1"], "none"),
    "pp2": (["--pipeline-model-parallel-size", "2", "--eval-iters", "0"], "longest"),
    "pp2-vpp2": (["--pipeline-model-parallel-size", "2",
                  "--num-layers-per-virtual-pipeline-stage", "1", "--eval-iters", "0"], "pack"),
    # the local context-parallel attention inside Megatron-LM's loop, evaluation included
    "cp2": (["--context-parallel-size", "2", "--eval-iters", "1"], "pack"),
}


def _layout_run(tmp_path, config, layout, *extra, name=None):
    flags, packing = LAYOUTS[layout]
    return _pretrain(tmp_path, name or layout, config, *flags, *extra,
                     "--adadpo-override", f"data.packing={packing}")


@pytest.fixture(scope="module")
def uninterrupted_pp2(oracle, tmp_path_factory):
    """The PP 2 job's records, which the checkpoint test's resumed job must repeat exactly."""
    return _layout_run(tmp_path_factory.mktemp("pp2"), oracle[0], "pp2")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_steps_equal_adadpo_train(oracle, uninterrupted_pp2, tmp_path, layout):
    """Megatron-LM's initialize and pretrain() on 2 processes (TP 2, PP 2, PP 2 x VPP 2, CP 2;
    padded, longest and packed micro-batches): each iteration's loss and gradient norm are
    adadpo-train's."""
    config, history = oracle
    records = (uninterrupted_pp2 if layout == "pp2" else
               _layout_run(tmp_path, config, layout))
    _assert_matches(records, history)
    # Megatron-LM's log reads the totals as the global batch's (sums of at most 4 x 8 shares
    # that are powers of two: exact in float32) and has no coef_max (a maximum, which its
    # sum-and-divide cannot give)
    for record in records:
        want = history[record["iteration"] - 1]
        assert record["pairs"] == want["pairs"] == TINY["train"]["global_batch_size"]
        assert record["tokens"] == want["tokens"]
        assert "adadpo/coef_max" not in record


@pytest.mark.slow
def test_a_pretrain_checkpoint_resumes_exactly_and_loads_in_adadpo_train_and_export(
        oracle, uninterrupted_pp2, tmp_path):
    """pretrain() saves at iteration 2 and exits; a second pretrain() resumes there and its
    iteration 3 is the uninterrupted run's, bitwise (same layout, same operations, the weights
    and optimizer state restored exactly). Its checkpoint, as model.load in adadpo-train, is
    the model adadpo-train's own step-2 checkpoint is; exported by adadpo-export-hf (with the
    run config describing it) and read back as model.hf, it is that model too."""
    config, history = oracle
    save = tmp_path / "megatron-lm"
    common = ["--save", save, "--save-interval", "2"]
    first = _layout_run(tmp_path, config, "pp2", *common, "--exit-interval", "2", name="first")
    assert first == uninterrupted_pp2[:2]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    resumed = _layout_run(tmp_path, config, "pp2", *common, "--load", save, name="resumed")
    assert resumed == uninterrupted_pp2[2:]

    out = tmp_path / "hf"
    result = run_command([*EXPORT, save / "iter_0000002", out, "--config", config])
    assert result.returncode == 0, result.stderr[-3000:]

    def first_step_of(name, *overrides):
        run = tmp_path / name
        result = run_command([*TRAIN, "--config", config,
                              f"train.output_dir={run}", "train.max_steps=1",
                              "reference.mode=resident", "data.eval_fraction=0", *overrides])
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])

    own = first_step_of("own", "model.load=" + str(
        config.parent / "adadpo-train" / "checkpoints" / "step_0000002"))
    theirs = first_step_of("theirs", f"model.load={save / 'iter_0000002'}")
    exported = first_step_of("exported", f"model.hf={out}", "model.preset=null",
                             "data.tokenizer=byte")
    # one step from the same weights: the first step of two layouts (rounding apart)
    gaps = tiny_training_gaps([own], SEQ)[0][0]
    for other in (theirs, exported):
        for key in ("logps/chosen", "logps/rejected", "grad_norm"):
            assert abs(other[key] - own[key]) <= gaps[key], (key, other[key], own[key])
    # and not the initial model: the two steps moved the weights
    assert abs(own["logps/chosen"] - history[0]["logps/chosen"]) > gaps["logps/chosen"]


@pytest.mark.slow
def test_a_flag_that_breaks_the_pair_layout_is_one_error_line_before_any_step(oracle):
    """Without --calculate-per-token-loss each micro-batch would be averaged alone: the job
    stops before building anything, naming the flag in one line, exit code 2."""
    config, _ = oracle
    flags = [str(f) for f in megatron_lm_flags(config) if f != "--calculate-per-token-loss"]
    result = run_command([sys.executable, "-m", PROG, *flags])
    assert result.returncode == 2, result.stderr[-3000:]
    one_error_line(result.stderr, PROG, "--calculate-per-token-loss is required")
