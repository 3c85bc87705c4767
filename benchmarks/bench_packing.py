"""Benchmark: pairs per second and real-token share for data.packing none, longest and pack.

    python benchmarks/bench_packing.py                  # CPU: 2 layers, hidden 256, seq 2048
    python benchmarks/bench_packing.py --hidden 4096 --layers 2 --pairs 64   # a GPU

The data: a synthetic preference set with UltraFeedback-like, long-tailed lengths (Llama-3
tokens), written as pretokenized pairs (random token ids, byte vocabulary):

    prompt    ~ LogNormal(median 90, sigma 1.0)   mean 148 tokens
    chosen    ~ LogNormal(median 230, sigma 0.75) mean 305 tokens
    rejected  ~ LogNormal(median 230, sigma 0.75)

Where the parameters come from: UltraFeedback-binarized's dataset card gives train_prefs as
405,688,662 bytes in 61,135 rows, 6,636 bytes a row, and a row stores the prompt four times
(prompt, and inside chosen, rejected and messages) and the chosen response twice and the
rejected once. At about 4.2 bytes per Llama-3 token of English, the means above give
4 x 148 x 4.2 + 3 x 305 x 4.2 = 6,330 bytes, within 5% of the card. How the total splits
between prompt and responses, and the spreads, are our assumption (prompts are shorter and
more skewed than answers). The tail is long: 0.7% of the pairs have a sequence over 2048
tokens and 0.7% a prompt over 1024 (max_prompt_length), truncated by the pipeline as in
training; a sequence averages 450 tokens, so padding to 2048 computes 22% real tokens.

Each mode runs in a fresh process through the real trainer (megatron-core schedule, DDP,
optimizer, resident reference, AdaDPO): one warm-up step, then --steps timed steps of --pairs
pairs. With the model wide enough that the layers dominate, a step's time follows the
computed tokens, so the pairs-per-second ratio follows the real-token share. Prints the table
and the ratios against none measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child_run import run_child

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "longest", "pack")


def make_data(path: Path, pairs: int, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)

    def lognormal(median, sigma, n):
        return (median * torch.exp(sigma * torch.randn(n, generator=g))).clamp(min=1).long()

    prompt, chosen, rejected = (lognormal(90, 1.0, pairs), lognormal(230, 0.75, pairs),
                                lognormal(230, 0.75, pairs))
    with open(path, "w") as f:
        for p, c, r in zip(prompt.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
            ids = torch.randint(0, 256, (p + c + r,), generator=g).tolist()
            f.write(json.dumps({"prompt_input_ids": ids[:p], "chosen_input_ids": ids[p:p + c],
                                "rejected_input_ids": ids[p + c:]}) + "\n")


def child(args) -> dict:
    import torch

    from adadpo_megatron.training.run_config import RunConfig
    from adadpo_megatron.training.trainer import Trainer

    heads = max(4, args.hidden // 64)
    raw = {
        "model": {"preset": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": heads, "num_query_groups": heads // 2,
                  "ffn_hidden_size": 4 * args.hidden},
        "loss": {"loss_type": "dpo", "beta": 0.1},
        "data": {"path": args.data, "seq_length": args.seq_length,
                 "max_prompt_length": args.seq_length // 2, "packing": args.mode,
                 "cache": False},
        "reference": {"mode": "resident"},
        "optimizer": {"optimizer": "adam", "lr": 1e-5},
        "train": {"global_batch_size": args.pairs, "micro_batch_size": args.micro_batch_size,
                  "max_steps": args.steps + 1, "output_dir": args.tmp, "resume": "never",
                  "progress": False, "tensorboard": False,
                  "dtype": "bfloat16" if torch.cuda.is_available() else "float32"},
    }
    trainer = Trainer(RunConfig.from_dict(raw)).setup()
    trainer.train_step(0)
    times, fractions = [], []
    for step in range(1, args.steps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = trainer.train_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        fractions.append(metrics["data/real_token_fraction"])
    trainer.close()
    step_s = statistics.median(times)
    return {"mode": args.mode, "step_s": step_s, "pairs_per_s": args.pairs / step_s,
            "real_token_fraction": statistics.mean(fractions)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dataset-pairs", type=int, default=2000)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # the child process
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ultrafeedback_like.jsonl"
        make_data(data, args.dataset_pairs)
        rows = []
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--data", str(data),
                   "--tmp", str(Path(tmp) / mode), "--pairs", str(args.pairs),
                   "--micro-batch-size", str(args.micro_batch_size), "--steps",
                   str(args.steps), "--seq-length", str(args.seq_length), "--hidden",
                   str(args.hidden), "--layers", str(args.layers)]
            rows.append(run_child(cmd, mode))
    print(f"seq_length {args.seq_length}, {args.pairs} pairs per step, micro-batch "
          f"{args.micro_batch_size}, {args.layers} layers x hidden {args.hidden}, "
          f"median of {args.steps} steps")
    print("| mode | step (s) | pairs/s | real-token fraction | pairs/s vs none |")
    print("| --- | --- | --- | --- | --- |")
    base = rows[0]["pairs_per_s"]
    for row in rows:
        print(f"| {row['mode']} | {row['step_s']:.2f} | {row['pairs_per_s']:.2f} | "
              f"{row['real_token_fraction']:.3f} | {row['pairs_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
