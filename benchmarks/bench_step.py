"""Benchmark: the whole training step, AdaDPO against DPO, fused against unfused log-probs.

    python benchmarks/bench_step.py                    # tiny CPU recipe, vocab padded to 384;
                                                       # with a GPU also the GPU-sized shape
    python benchmarks/bench_step.py --vocab 32768      # a large vocabulary (fused matters)
    python benchmarks/bench_step.py --config benchmarks/configs/gpu_step.yaml --vocab 128256

The GPU-sized shape (benchmarks/configs/gpu_step.yaml) is two layers of Llama-3-8B widths,
4096-token sequences, vocabulary 128256, bf16.

Each variant runs in a fresh single process through adadpo_megatron's real trainer
(megatron-core schedule, DDP, optimizer): 2 warm-up steps, then --steps timed steps. Extra
peak memory is the peak resident set size during the timed steps minus the size before them,
measured on CPU in a second process whose allocator returns freed memory
(MEASURABLE_MALLOC); on a GPU it is the CUDA allocator's peak. Variants:
    dpo            loss.adaptive=false
    adadpo         loss.adaptive=true (the coefficient and its metrics)
    adadpo_fused   adadpo with model.fused_logprobs=true
It also times preference_loss alone with the coefficient on and off, to show what the
coefficient costs per step. Prints one table and the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from child_run import run_child
from resident_memory import reset_peak, rss_bytes

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dpo": ["loss.adaptive=false"],
    "adadpo": ["loss.adaptive=true"],
    "adadpo_fused": ["loss.adaptive=true", "model.fused_logprobs=true"],
}


def child(args) -> dict:
    import torch

    from adadpo_megatron.training.run_config import load_run_config
    from adadpo_megatron.training.trainer import Trainer

    overrides = [f"train.output_dir={args.tmp}", "train.resume=never", "train.progress=false",
                 "train.tensorboard=false", f"train.max_steps={args.steps + 2}",
                 f"model.make_vocab_size_divisible_by={args.vocab}", *VARIANTS[args.variant]]
    trainer = Trainer(load_run_config(str(REPO / args.config), overrides)).setup()
    for step in range(2):
        trainer.train_step(step)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not reset_peak():
            raise RuntimeError("cannot reset the peak resident size (/proc/self/clear_refs)")
        base = rss_bytes("VmRSS")
    times = []
    for step in range(2, 2 + args.steps):
        start = time.perf_counter()
        trainer.train_step(step)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if gpu else rss_bytes("VmHWM")) - base
    trainer.close()
    return {"variant": args.variant, "step_ms": 1e3 * statistics.median(times),
            "extra_peak_mib": peak / 2**20, "vocab": trainer.run.vocab_size}


def coefficient_cost(pairs: int, repeats: int = 2000) -> dict:
    """preference_loss forward + backward on [pairs], with the coefficient on and off."""
    import torch

    from adadpo_megatron.ops.loss import preference_loss
    from adadpo_megatron.ops.loss_config import LossConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the step's loss runs
    g = torch.Generator().manual_seed(0)
    n = torch.randint(5, 30, (pairs,), generator=g).float()
    sums = [(-(torch.rand(pairs, generator=g) + 0.5) * n).to(device) for _ in range(4)]
    n = n.to(device)
    configs = {"dpo": LossConfig(adaptive=False), "adadpo": LossConfig(adaptive=True)}
    times = {name: [] for name in configs}
    for _ in range(repeats):  # interleaved, so that drift of the machine hits both alike
        for name, config in configs.items():
            pc, pr = sums[0].clone().requires_grad_(), sums[1].clone().requires_grad_()
            start = time.perf_counter()
            losses, _ = preference_loss(pc, pr, n, n, sums[2], sums[3], config=config)
            losses.sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# glibc keeps freed memory mapped for reuse, so a step after the warm-up steps could peak
# without raising the resident set; serving every allocation over 64 KiB with its own mmap,
# returned on free, makes the resident peak follow the live tensors (and undoes the
# keep-everything settings docs/CPU.md recommends for runs, should the shell have them).
MEASURABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
                     "MALLOC_MMAP_MAX_": "65536", "MALLOC_TOP_PAD_": "0"}
CPU_SHAPE = ("configs/tiny_cpu.yaml", 128)
GPU_SHAPE = ("benchmarks/configs/gpu_step.yaml", 128256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a run config; default: the tiny CPU recipe, and "
                        "with a GPU also " + GPU_SHAPE[0])
    parser.add_argument("--vocab", type=int,
                        help="pad the vocabulary to a multiple of this (model.make_vocab_size_"
                             "divisible_by); 32768 gives a 32768-entry vocabulary. Default: "
                             "128 for the tiny recipe, 128256 for the GPU shape")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    if args.config:
        shapes = [(args.config, args.vocab or dict([CPU_SHAPE, GPU_SHAPE]).get(args.config, 128))]
    else:
        import torch

        shapes = [CPU_SHAPE] + ([GPU_SHAPE] if torch.cuda.is_available() else [])
        if args.vocab:
            shapes = [(config, args.vocab) for config, _ in shapes]
    for config, vocab in shapes:
        benchmark(config, vocab, args.steps)


def benchmark(config_path: str, vocab: int, steps: int) -> None:
    """Runs every variant on one shape and prints its table and ratios."""
    import tempfile

    import torch

    def run(variant: str, malloc_env: dict) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--variant", variant, "--tmp", tmp, "--config",
                   config_path, "--vocab", str(vocab), "--steps", str(steps)]
            return run_child(cmd, f"{config_path}: {variant}", env=malloc_env)

    rows = []
    for variant in VARIANTS:
        row = run(variant, {})
        if not torch.cuda.is_available():
            # time with the default allocator, memory in a second process with one that
            # returns freed memory (which slows small allocations down)
            row["extra_peak_mib"] = run(variant, MEASURABLE_MALLOC)["extra_peak_mib"]
        rows.append(row)
    from adadpo_megatron.training.run_config import load_run_config

    config = load_run_config(str(REPO / config_path))
    pairs = config.train.micro_batch_size  # one loss call per micro-batch (single process)
    calls = config.train.global_batch_size // pairs
    loss_ms = coefficient_cost(pairs)

    print(f"{config_path}, padded vocabulary {rows[0]['vocab']}, median of {steps} steps")
    print(f"{'variant':<14}{'step ms':>10}{'extra MiB':>11}")
    for r in rows:
        print(f"{r['variant']:<14}{r['step_ms']:>10.1f}{r['extra_peak_mib']:>11.0f}")
    by = {r["variant"]: r for r in rows}
    print(f"adadpo / dpo step time: {by['adadpo']['step_ms'] / by['dpo']['step_ms']:.3f}x")
    coefficient = calls * (loss_ms["adadpo"] - loss_ms["dpo"])
    print(f"preference_loss fwd+bwd on a micro-batch of {pairs} pairs: dpo "
          f"{loss_ms['dpo']:.3f} ms, adadpo {loss_ms['adadpo']:.3f} ms; over the {calls} "
          f"micro-batches of a step the coefficient costs {coefficient:.3f} ms, "
          f"{100 * coefficient / by['adadpo']['step_ms']:.2f}% of the step")
    fused, unfused = by["adadpo_fused"], by["adadpo"]
    print(f"fused / unfused: step time {fused['step_ms'] / unfused['step_ms']:.3f}x, extra "
          f"peak memory {fused['extra_peak_mib'] / max(unfused['extra_peak_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
