"""Benchmark: pairs per second of adadpo-precompute-reference, before and after it planned its
micro-batches as training does (issue 24).

    python benchmarks/bench_precompute.py                     # CPU, ~3 minutes

Three variants, each in a fresh process through the real command (megatron-core schedule,
forward-only, the cache written), over the same synthetic pairs as benchmarks/bench_packing.py
(``--data short``: long-tailed, prompt mean 60 tokens, responses mean 120, seq_length 512):

    one_padded   what precompute did before: one micro-batch of padded rows per schedule
                 call (data.packing none, a global batch of micro_batch_size pairs)
    padded       a global batch of pairs per schedule call, padded rows (data.packing none)
    pack         a global batch per call, packed (data.packing pack, the default)

Prints one table with each variant's pairs/s and its ratio to one_padded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_packing import make_data
from child_run import run_child

VARIANTS = {"one_padded": ("none", True), "padded": ("none", False), "pack": ("pack", False)}


def child(args) -> dict:
    from adadpo_megatron.training.precompute import precompute_reference
    from adadpo_megatron.training.run_config import RunConfig

    packing, one_per_call = VARIANTS[args.variant]
    heads = max(4, args.hidden // 64)
    raw = {
        "model": {"preset": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": heads, "num_query_groups": heads // 2,
                  "ffn_hidden_size": 4 * args.hidden},
        "data": {"path": args.data_file, "seq_length": args.seq_length,
                 "max_prompt_length": args.seq_length // 2, "packing": packing,
                 "cache": False},
        "reference": {"mode": "precompute", "cache_path": str(Path(args.tmp) / "ref.pt")},
        "train": {"global_batch_size": (args.micro_batch_size if one_per_call
                                        else args.global_batch_size),
                  "micro_batch_size": args.micro_batch_size, "output_dir": args.tmp,
                  "progress": False, "tensorboard": False},
    }
    start = time.perf_counter()
    precompute_reference(RunConfig.from_dict(raw))
    return {"variant": args.variant, "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="pairs in the data set")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # the child process
        print(json.dumps(child(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "short.jsonl"
        make_data(data, args.pairs, "short")
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--data-file", str(data),
                   "--tmp", str(Path(tmp) / variant), "--micro-batch-size",
                   str(args.micro_batch_size), "--global-batch-size",
                   str(args.global_batch_size), "--seq-length", str(args.seq_length),
                   "--hidden", str(args.hidden), "--layers", str(args.layers)]
            rows.append(run_child(cmd, variant))
            print(f"  {variant:10s} {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.pairs} pairs (--data short), seq_length {args.seq_length}, micro-batch "
          f"{args.micro_batch_size}, {args.layers} layers x hidden {args.hidden}; the whole "
          "command, set-up included")
    print("| variant | seconds | pairs/s | vs one_padded |")
    print("| --- | ---: | ---: | ---: |")
    base = rows[0]["seconds"]
    for row in rows:
        print(f"| {row['variant']} | {row['seconds']:.1f} | {args.pairs / row['seconds']:.1f} "
              f"| {base / row['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
