"""The examples: the hand-built megatron-core loop runs, and every example stays valid Python."""

import os
import subprocess
import sys

import pytest

from tests.support.training import REPO, free_port


@pytest.mark.slow
def test_megatron_loop_example_runs():
    """examples/megatron_loop.py: the forward_step in a hand-built megatron-core loop."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "megatron_loop.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    assert lines[0].startswith("step 0: loss 0.693147")


def test_every_example_compiles():
    """Examples that need a GPU or Megatron-LM are not run here, but must stay valid Python."""
    import py_compile

    for path in sorted((REPO / "examples").rglob("*.py")):
        py_compile.compile(str(path), doraise=True)


def test_every_gpu_check_run_config_is_valid(tmp_path):
    """examples/gpu_check.py runs only on a GPU; a config it builds that fails validation
    (as an lr of 0 and an lr below tiny_cpu.yaml's min_lr once did) would make its first GPU
    run report FAILED for a reason that has nothing to do with the GPU."""
    import importlib.util

    from adadpo_megatron.training.run_config import load_run_config

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "examples" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    tiny = str(REPO / "configs" / "tiny_cpu.yaml")
    configs = [load_run_config(tiny, gpu_check.step_overrides(fp8)) for fp8 in (False, True)]
    padded = [("padded", ["data.packing=none"])]
    for loss_overrides, variants in (((), padded + list(gpu_check.PACKED_VARIANTS)),
                                     *((o, padded + [("thd", ["data.packing=pack"])])
                                       for _, o in gpu_check.LOSS_VARIANTS)):
        for _, extra in variants:
            configs.append(load_run_config(tiny, gpu_check.packed_overrides(extra,
                                                                           loss_overrides)))
    _, moe = gpu_check._tiny_hf_run(tmp_path / "moe", gpu_check.qwen3_moe_config())
    config, section, train = gpu_check.lora_run()
    _, lora = gpu_check._tiny_hf_run(tmp_path / "lora", config, section, **train)
    assert moe.model.transformer["num_moe_experts"] == 8
    assert lora.model.lora.rank == 8 and lora.reference.mode == "adapters_off"
    assert all(c.train.dtype == "bfloat16" for c in configs)


def test_the_gpu_checks_megatron_lm_runs_are_accepted(tmp_path, monkeypatch):
    """gpu_check.py's two pretrain() runs: Megatron-LM's parser and validation take their
    flags, and the plug-in's checks their flags with the run config (all but the machine, which
    is the GPU's to check)."""
    import importlib.util

    from megatron.training.arguments import parse_args, validate_args

    from adadpo_megatron.integrations import megatron_lm

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "examples" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    megatron_lm.prepare()
    _, first, second, save = gpu_check.megatron_lm_runs(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    configs = []
    for flags in (first, second):
        monkeypatch.setattr(sys, "argv", ["gpu_check", *flags])
        args = parse_args(megatron_lm.add_arguments)
        validate_args(args, {"dataloader_type": "external"})
        args.padded_vocab_size = 384  # Megatron-LM's tokenizer set-up: 259 padded to 128
        configs.append(megatron_lm.run_config(args))
    assert configs[0].loss.loss_type == "simpo" and configs[0].reference.mode == "none"
    assert configs[1].reference.mode == "precompute"
    assert configs[1].model.load == str(save / "iter_0000001")
    assert all(c.train.dtype == "bfloat16" and c.data.packing == "pack" for c in configs)


@pytest.mark.parametrize("cp", [1, 2])
def test_the_gpu_checks_context_parallel_inputs_split_both_ways(cp):
    """gpu_check.py's CP item: its packed micro-batch splits under Transformer Engine's THD
    rule (every segment a multiple of 2 x CP; the torch version of TE's split is the oracle of
    tests/mcore/test_packed_attention.py) and as rows; each split gives every token to exactly
    one rank; its attention configs are megatron-core's (cp_comm_type a field it takes)."""
    import importlib.util

    import torch

    from adadpo_megatron.mcore.context_parallel_attention import chunk_positions
    from adadpo_megatron.mcore.packed_attention import thd_cu_seqlens, thd_partition_index

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "examples" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    lengths, segments, (q, k, v, grad) = gpu_check.context_parallel_inputs(cp)
    total = len(segments)
    assert (lengths % (2 * cp) == 0).all() and q.dtype == torch.bfloat16
    assert q.shape[0] == k.shape[0] == grad.shape[0] == total
    cu = thd_cu_seqlens(segments[None])
    assert cu[1:].diff().tolist() == lengths[1:].tolist()
    for split in (lambda r: thd_partition_index(cu, total, cp, r),
                  lambda r: chunk_positions(total, cp, r)):
        covered = torch.cat([split(r) for r in range(cp)]).sort().values
        assert covered.tolist() == list(range(total))
    for comm in ("p2p", "all_gather"):
        config = gpu_check.cp_attention_config(cp, comm, torch.bfloat16)
        assert (config.context_parallel_size, config.cp_comm_type) == (cp, comm)


def _cp_setup_worker(rank, world):
    import importlib.util

    from megatron.core.tensor_parallel.random import (
        _MODEL_PARALLEL_RNG_TRACKER_NAME,
        get_cuda_rng_tracker,
    )

    from adadpo_megatron.mcore import cpu_compat

    cpu_compat.enable()
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "examples" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    group = gpu_check.context_parallel_setup(world)
    assert group.size() == world
    # what megatron-core's attention forks on a GPU (cpu_compat makes fork a no-op here)
    assert _MODEL_PARALLEL_RNG_TRACKER_NAME in get_cuda_rng_tracker().get_states()


@pytest.mark.slow  # spawns processes
def test_the_gpu_checks_context_parallel_ranks_seed_what_attention_forks():
    """gpu_check.py's CP worker builds megatron-core attention by hand, outside a trainer:
    its set-up must register the model-parallel RNG state, or the first forward on a GPU
    raises 'cuda rng state model-parallel-rng is not added' (found in review)."""
    from tests.support.distributed import run_distributed

    run_distributed(_cp_setup_worker, 2)
