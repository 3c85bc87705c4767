"""Benchmark: per-token log-probs from bfloat16 logits, forward and backward.

Providers:
    adadpo    adadpo_megatron.ops.logprobs.vocab_parallel_logprobs (chunked, recomputing backward)
    megatron  -megatron.core.tensor_parallel.vocab_parallel_cross_entropy
    naive     log_softmax(logits.float()).gather(labels)

Each provider runs in a fresh process, so that one's allocations never count against
another's. Extra peak memory is the peak resident set size during one forward + backward
minus the resident size just before it (logits, labels and output gradient already
allocated); on Linux the peak is reset through /proc/self/clear_refs, elsewhere the
lifetime peak is used. The logits' own gradient (one bfloat16 copy, the same for every
provider) is part of each provider's extra memory. On a GPU (--device cuda) the CUDA
allocator's peak is used instead.

    python benchmarks/bench_logprobs.py --batch 2 --seq 2048 --vocab 32768

Prints one row per provider and the ratios against megatron; --csv appends the rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

from child_run import run_child
from resident_memory import reset_peak, rss_bytes

PROVIDERS = ("adadpo", "megatron", "naive")


def run_provider(args) -> dict:
    """Runs in the child process: times and measures one provider."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.seq, args.vocab)
    logits = torch.empty(shape, dtype=dtype, device=device)
    for b in range(args.batch):  # fill without a full-size float32 temporary
        for s in range(0, args.seq, 256):
            logits[b, s:s + 256].normal_(0.0, 2.0)
    logits.requires_grad_()
    labels = torch.randint(0, args.vocab, shape[:2], device=device)
    labels[:, : args.seq // 4] = -100  # a prompt: ignored positions
    grad_out = torch.randn(shape[:2], device=device)

    if args.provider == "adadpo":
        from adadpo_megatron.ops.logprobs import vocab_parallel_logprobs

        def forward():
            return vocab_parallel_logprobs(logits, labels, chunk_size=args.chunk_size)
    elif args.provider == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        dist.init_process_group("gloo" if device.type == "cpu" else "nccl",
                                init_method=f"file://{args.tmp}/rdzv", rank=0, world_size=1)
        keep = labels != -100
        safe = torch.where(keep, labels, torch.zeros_like(labels))

        def forward():
            return -vocab_parallel_cross_entropy(logits, safe, tp_group=dist.group.WORLD) * keep
    else:
        keep = labels != -100
        safe = torch.where(keep, labels, torch.zeros_like(labels))

        def forward():
            logp = torch.log_softmax(logits.float(), dim=-1)
            return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step():
        logits.grad = None
        sync()
        t0 = time.perf_counter()
        out = forward()
        sync()
        t1 = time.perf_counter()
        out.backward(grad_out)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    # Memory first, on a cold process: the first step's peak is the one a training step sees.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_step()
        extra_peak = torch.cuda.max_memory_allocated() - base
        peak_source = "cuda allocator"
    else:
        exact = reset_peak()
        base = rss_bytes("VmRSS")
        one_step()
        extra_peak = rss_bytes("VmHWM") - base
        peak_source = "VmHWM reset" if exact else "VmHWM lifetime"
    fwd, bwd = [], []
    for _ in range(args.repeats):
        f, b = one_step()
        fwd.append(f)
        bwd.append(b)
    return {
        "provider": args.provider,
        "forward_ms": 1e3 * statistics.median(fwd),
        "backward_ms": 1e3 * statistics.median(bwd),
        "total_ms": 1e3 * (statistics.median(fwd) + statistics.median(bwd)),
        "extra_peak_mib": extra_peak / 2**20,
        "logits_mib": logits.numel() * logits.element_size() / 2**20,
        "peak_source": peak_source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk for adadpo (default: the op's own)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--csv", default=None, help="append the rows to this CSV file")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.provider:  # child
        print(json.dumps(run_provider(args)))
        return

    import tempfile

    rows = []
    for provider in args.providers.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--provider", provider, "--tmp", tmp,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            rows.append(run_child(cmd, provider))

    print(f"batch={args.batch} seq={args.seq} vocab={args.vocab} dtype={args.dtype} "
          f"device={args.device} repeats={args.repeats} (median); "
          f"logits {rows[0]['logits_mib']:.0f} MiB; peak from {rows[0]['peak_source']}")
    print(f"{'provider':<10}{'fwd ms':>10}{'bwd ms':>10}{'total ms':>10}{'extra MiB':>11}")
    for r in rows:
        print(f"{r['provider']:<10}{r['forward_ms']:>10.1f}{r['backward_ms']:>10.1f}"
              f"{r['total_ms']:>10.1f}{r['extra_peak_mib']:>11.0f}")
    by_name = {r["provider"]: r for r in rows}
    if "megatron" in by_name:
        base = by_name["megatron"]
        for r in rows:
            if r is base:
                continue
            print(f"{r['provider']} / megatron: time {r['total_ms'] / base['total_ms']:.2f}x, "
                  f"extra peak memory {r['extra_peak_mib'] / base['extra_peak_mib']:.2f}x")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["batch", "seq", "vocab", "dtype", "device",
                                                   *rows[0].keys()])
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow({"batch": args.batch, "seq": args.seq, "vocab": args.vocab,
                                 "dtype": args.dtype, "device": args.device, **r})


if __name__ == "__main__":
    main()
