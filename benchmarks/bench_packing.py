"""Benchmark: pairs per second and real-token share of data.packing none, longest and pack,
swept over micro-batch sizes.

    python benchmarks/bench_packing.py                    # CPU: the sweep below, ~6 minutes
    python benchmarks/bench_packing.py --data ultrafeedback --seq-length 2048 \
        --micro-batch-size 2                              # longer, UltraFeedback-like pairs
    python benchmarks/bench_packing.py --hidden 4096 --layers 2 --pairs 64   # a GPU

Two synthetic preference sets, written as pretokenized pairs (random token ids, byte
vocabulary), log-normal lengths truncated as the data pipeline truncates them:

    --data short (default)   prompt mean 60 tokens (sigma 1.0), responses mean 120 (sigma
                             0.75): the long-tailed set issue 17 was reported on, at
                             seq_length 512 and 16 pairs a step.
    --data ultrafeedback     prompt median 90 (sigma 1.0, mean 148), responses median 230
                             (sigma 0.75, mean 305), for seq_length 2048.

Where the UltraFeedback parameters come from: UltraFeedback-binarized's dataset card gives
train_prefs as 405,688,662 bytes in 61,135 rows, 6,636 bytes a row, and a row stores the
prompt four times (prompt, and inside chosen, rejected and messages) and the chosen response
twice and the rejected once. At about 4.2 bytes per Llama-3 token of English, the means above
give 4 x 148 x 4.2 + 3 x 305 x 4.2 = 6,330 bytes, within 5% of the card. How the total splits
between prompt and responses, and the spreads, are our assumption (prompts are shorter and
more skewed than answers).

Each (mode, micro-batch size) runs in a fresh process through the real trainer (megatron-core
schedule, DDP, optimizer, resident reference, AdaDPO): one warm-up step, then --steps timed
steps of --pairs pairs; the real-token fraction is that of the plans of the first
--fraction-steps steps (planned, not run). With the model wide enough that the layers
dominate, a step's time follows the computed tokens, so the pairs-per-second ratio follows the
real-token share.
Prints one table (each row's ratio is against none at the same micro-batch size) and writes
it as CSV to --csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child_run import run_child

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "longest", "pack")
# (prompt median, prompt sigma, response median, response sigma), in tokens
DATA_SHAPES = {
    "short": (60 / math.exp(0.5), 1.0, 120 / math.exp(0.75 ** 2 / 2), 0.75),
    "ultrafeedback": (90, 1.0, 230, 0.75),
}


def make_data(path: Path, pairs: int, shape: str, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt_median, prompt_sigma, response_median, response_sigma = DATA_SHAPES[shape]

    def lognormal(median, sigma, n):
        return (median * torch.exp(sigma * torch.randn(n, generator=g))).clamp(min=1).long()

    prompt = lognormal(prompt_median, prompt_sigma, pairs)
    chosen = lognormal(response_median, response_sigma, pairs)
    rejected = lognormal(response_median, response_sigma, pairs)
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
        "train": {"global_batch_size": args.pairs, "micro_batch_size": args.micro_batch_size[0],
                  "max_steps": max(args.steps + 1, args.fraction_steps),
                  "output_dir": args.tmp, "resume": "never",
                  "progress": False, "tensorboard": False,
                  "dtype": "bfloat16" if torch.cuda.is_available() else "float32"},
    }
    trainer = Trainer(RunConfig.from_dict(raw)).setup()
    trainer.train_step(0)
    times, micro_batches = [], 0
    for step in range(1, args.steps + 1):
        micro_batches += len(trainer.micro_batches(step)[0])  # what the step below runs
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # planned, not run: the share over many steps, as over a long run
    fraction = trainer.run.real_token_fraction(range(args.fraction_steps))
    trainer.close()
    step_s = statistics.median(times)
    return {"mode": args.mode, "micro_batch_size": args.micro_batch_size[0], "step_s": step_s,
            "pairs_per_s": args.pairs / step_s, "real_token_fraction": fraction,
            "micro_batches": micro_batches / args.steps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA_SHAPES), default="short")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--micro-batch-size", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="the sweep (pairs per micro-batch; pack's token budget is "
                             "2 x this x seq_length)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--fraction-steps", type=int, default=100,
                        help="steps planned (not run) for the real-token fraction")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dataset-pairs", type=int, default=2000)
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "packing.csv"))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # the child process
        args.data = args.data_file
        print(json.dumps(child(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.data}.jsonl"
        make_data(data, args.dataset_pairs, args.data)
        for m in args.micro_batch_size:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--mode", mode, "--data-file", str(data),
                       "--tmp", str(Path(tmp) / f"{mode}-{m}"), "--pairs", str(args.pairs),
                       "--micro-batch-size", str(m), "--steps", str(args.steps),
                       "--fraction-steps", str(args.fraction_steps),
                       "--seq-length", str(args.seq_length), "--hidden", str(args.hidden),
                       "--layers", str(args.layers)]
                rows.append(run_child(cmd, f"{mode} at micro-batch size {m}"))
                print(f"  {mode:8s} micro-batch {m:3d}: {rows[-1]['step_s']:.2f} s/step",
                      file=sys.stderr, flush=True)
    print(f"--data {args.data}, seq_length {args.seq_length}, {args.pairs} pairs per step, "
          f"{args.layers} layers x hidden {args.hidden}, median of {args.steps} steps")
    print("| micro-batch size | mode | micro-batches | step (s) | pairs/s | real-token fraction "
          "| pairs/s vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = {r["micro_batch_size"]: r["pairs_per_s"] for r in rows if r["mode"] == "none"}
    for row in rows:
        m = row["micro_batch_size"]
        ratio = f"{row['pairs_per_s'] / base[m]:.2f}x" if m in base else "-"
        row["vs_none"] = row["pairs_per_s"] / base[m] if m in base else float("nan")
        print(f"| {m} | {row['mode']} | {row['micro_batches']:.1f} | {row['step_s']:.2f} | "
              f"{row['pairs_per_s']:.2f} | {row['real_token_fraction']:.3f} | {ratio} |")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
