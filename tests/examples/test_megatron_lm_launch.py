"""examples/launch/megatron_lm_llama31_8b.sh: the Llama-3.1-8B Megatron-LM job with the plug-in.

No GPUs or Llama weights here: ``torchrun`` is a stand-in on PATH that writes down its
arguments. Everything else is real: the launch script builds the command, Megatron-LM's own
parser and validation take its flags on the job's 16 ranks, the plug-in's flag checks pass and
its run config (configs/megatron_lm_llama31_8b_adadpo.yaml) loads with the keys the flags
decide; what needs the model and tokenizer files (the vocabulary, the reference cache) is the
first GPU run's to check.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys

from tests.support.training import REPO

TORCHRUN = f"""#!/usr/bin/env bash
exec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"
"""


def test_the_llama31_8b_job_passes_megatron_lm_and_the_plug_in(tmp_path, monkeypatch):
    from megatron.training.arguments import parse_args, validate_args

    from adadpo_megatron.integrations import megatron_lm
    from adadpo_megatron.integrations.megatron_lm_checks import flag_overrides
    from adadpo_megatron.training.run_config import load_run_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755 | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NNODES": "2", "RDZV_HOST": "node001"}
    result = subprocess.run(["bash", "examples/launch/megatron_lm_llama31_8b.sh"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    script = argv.index("examples/megatron_lm_pretrain.py")
    assert argv[:script][argv.index("--nnodes") + 1] == "2"
    flags = argv[script + 1:]

    megatron_lm.prepare()
    monkeypatch.setattr(sys, "argv", ["pretrain", *flags])
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.chdir(REPO)  # the script's paths are the repository's
    args = parse_args(megatron_lm.add_arguments)
    validate_args(args, {"dataloader_type": "external"})
    megatron_lm.check_flags(args)
    assert (args.data_parallel_size, args.tensor_model_parallel_size) == (8, 2)
    config = load_run_config(args.adadpo_config, flag_overrides(args))
    megatron_lm.check_architecture(args, config)  # the flags build the preset's Llama-3.1-8B
    assert config.data.seq_length == args.seq_length == 2048
    assert config.train.dtype == "bfloat16" and args.bf16
    assert config.reference.mode == "precompute" and config.loss.adaptive
    assert (config.train.global_batch_size, config.train.micro_batch_size) == (128, 1)
