"""Benchmark: adadpo-train against TRL's DPOTrainer, side by side on the same model and data.

    python benchmarks/bench_vs_trl.py                      # CPU, one thread: ~6 minutes
    python benchmarks/bench_vs_trl.py --rounds 3 --steps 5 # steadier medians, ~25 minutes

The same tiny random Llama (transformers' LlamaForCausalLM, hidden 256, 4 layers, 4 heads, 2
KV heads, float32, saved with save_pretrained and read by both: ours through model.hf), the
same text pairs (a word-level tokenizer, so both tokenise alike: prompts ~120 tokens,
responses ~250, log-normal, none past max length 1024), DPO (sigmoid, beta 0.1), 16 pairs a
step in micro-batches of 4 pairs, a precomputed reference (ours: adadpo-precompute-reference
before the runs; TRL: precompute_ref_log_probs inside its run, before training), AdamW.

Each variant runs in a fresh process, one thread (OMP_NUM_THREADS=1), variants interleaved
round after round: ours with data.packing none, longest, pack, pack-4k and pack-3k (pack
with 4096- and 3072-token micro-batches), and TRL. A run times --steps steps after one
warm-up step; pairs/s is 16 / the median step time over all rounds. Peak RSS is the
process's (ru_maxrss), model, data and reference precompute (TRL's) included; its minor page
faults and the share of its CPU time spent in the kernel show the allocator's churn (the
whole process, start-up included). The tokens a micro-batch computes (rows times their
length, padding included) are counted at each training forward, on both sides. "Same work"
is checked, not assumed: both sides' precomputed reference log-probs of every pair are
summed and compared (the same model on the same tokens gives the same sums to float32
rounding). --malloc-env runs every child with MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<1 TiB> MALLOC_TOP_PAD_=<1 GiB> (docs/CPU.md).
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from child_run import run_child

# ours by data.packing, and TRL. pack's default budget is a padded micro-batch of 4 pairs at
# max length, 8192 tokens (~8 pairs of this data); pack-4k and pack-3k cap micro-batches at
# 4096 and 3072 tokens: TRL's micro-batch of 4 pairs computes ~4700 tokens here on average,
# ~3040 of them real (a pair is ~760 tokens: its prompt twice and both responses)
BUDGETS = {"pack-4k": 4096, "pack-3k": 3072}
VARIANTS = ("none", "longest", "pack", "pack-4k", "pack-3k", "trl")
PAIRS_PER_STEP, MICRO_PAIRS, MAX_LENGTH, BETA = 16, 4, 1024, 0.1
WORDS = 500  # the tokenizer's words; ids 0..499, then BOS 500 and EOS 501
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
              "MALLOC_TOP_PAD_": str(1 << 30)}


def make_model_and_data(directory: Path, pairs: int, seed: int = 0) -> Path:
    """A random Llama and its word-level tokenizer in ``directory/hf``; ``pairs`` text pairs
    in ``directory/pairs.jsonl`` (explicit prompt / chosen / rejected)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(WORDS)} | {"<s>": WORDS, "</s>": WORDS + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                     bos_token="<s>", eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    g = torch.Generator().manual_seed(seed)

    def lengths(median, sigma, cap):
        return (median * torch.exp(sigma * torch.randn(pairs, generator=g))).clamp(4, cap).long()

    # medians ~ the UltraFeedback-like shape; caps keep prompt + response under 1024
    prompt, chosen, rejected = lengths(110, 0.5, 400), lengths(230, 0.5, 600), \
        lengths(230, 0.5, 600)
    with open(directory / "pairs.jsonl", "w") as f:
        for p, c, r in zip(prompt.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
            words = [f"w{i}" for i in torch.randint(0, WORDS, (p + c + r,), generator=g).tolist()]
            # responses start with a space: TRL tokenises prompt + response as one string
            f.write(json.dumps({"prompt": " ".join(words[:p]),
                                "chosen": " " + " ".join(words[p:p + c]),
                                "rejected": " " + " ".join(words[p + c:])}) + "\n")
    return directory


def our_config(directory: Path, variant: str, steps: int) -> dict:
    packing, budget = ("pack", BUDGETS[variant]) if variant in BUDGETS else (variant, None)
    return {
        "model": {"hf": str(directory / "hf")},
        "loss": {"loss_type": "dpo", "beta": BETA},
        "data": {"path": str(directory / "pairs.jsonl"), "seq_length": MAX_LENGTH,
                 "max_prompt_length": 512, "packing": packing,
                 "max_tokens_per_micro_batch": budget},
        "reference": {"mode": "precompute",
                      "cache_path": str(directory / "reference.pt")},
        "optimizer": {"optimizer": "adam", "lr": 1e-6, "weight_decay": 0.0, "clip_grad": 1.0},
        "train": {"global_batch_size": PAIRS_PER_STEP, "micro_batch_size": MICRO_PAIRS,
                  "max_steps": steps + 1, "output_dir": str(directory / f"run-{variant}"),
                  "resume": "never", "overwrite": True, "progress": False,
                  "tensorboard": False, "save_interval": 10**6},
    }


def child_ours(directory: Path, variant: str, steps: int) -> dict:
    import torch

    from adadpo_megatron.training.run_config import RunConfig
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(RunConfig.from_dict(our_config(directory, variant, steps))).setup()
    computed = []  # tokens of each micro-batch's forward (rows x their length)
    trainer.model[0].register_forward_pre_hook(
        lambda module, args, kwargs: computed.append(
            kwargs.get("input_ids", args[0] if args else None).numel()), with_kwargs=True)
    losses = [trainer.train_step(0)["loss"]]
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        losses.append(trainer.train_step(step)["loss"])
        times.append(time.perf_counter() - start)
    reference = torch.load(directory / "reference.pt", weights_only=False)
    trainer.close()
    return {"times": times, "losses": [float(x) for x in losses],
            "reference_sum": _reference_sum(reference), "computed": computed}


def _reference_sum(cache) -> list:
    """[chosen, rejected] sums over every pair of the reference cache's log-probs ([N, 2])."""
    return cache["logps"].double().sum(0).tolist()


def child_trl(directory: Path, steps: int) -> dict:
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    times, losses, last = [], [], [None]

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - last[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    model = transformers.AutoModelForCausalLM.from_pretrained(directory / "hf",
                                                              torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "hf")
    data = datasets.load_dataset("json", data_files=str(directory / "pairs.jsonl"),
                                 split="train")
    args = DPOConfig(
        output_dir=str(directory / "trl"), per_device_train_batch_size=MICRO_PAIRS,
        gradient_accumulation_steps=PAIRS_PER_STEP // MICRO_PAIRS, max_steps=steps + 1,
        learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
        loss_type=["sigmoid"], max_length=MAX_LENGTH, precompute_ref_log_probs=True,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Clock()])
    computed = []  # tokens of each training forward: [2 x pairs, longest], padded
    model.register_forward_pre_hook(
        lambda module, args, kwargs: computed.append(
            kwargs.get("input_ids", args[0] if args else None).numel()), with_kwargs=True)
    ref = trainer.train_dataset
    reference_sum = [float(torch.tensor(ref["ref_chosen_logps"], dtype=torch.float64).sum()),
                     float(torch.tensor(ref["ref_rejected_logps"], dtype=torch.float64).sum())]
    trainer.train()
    return {"times": times[1:], "losses": losses, "reference_sum": reference_sum,
            "computed": computed}


def child(args) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    directory = Path(args.dir)
    if args.variant == "trl":
        out = child_trl(directory, args.steps)
    else:
        out = child_ours(directory, args.variant, args.steps)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_mib"] = usage.ru_maxrss / 1024
    # the allocator's churn shows as minor page faults and CPU time spent in the kernel
    out["minor_faults"] = usage.ru_minflt
    out["kernel_share"] = usage.ru_stime / (usage.ru_utime + usage.ru_stime)
    out["variant"] = args.variant
    return out


def precompute(directory: Path, config: Optional[dict] = None) -> None:
    """adadpo-precompute-reference on the run config (every variant reads its cache), or on
    ``config``."""
    import yaml

    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config or our_config(directory, "pack", 1)))
    result = subprocess.run([sys.executable, "-m", "adadpo_megatron", "precompute-reference",
                             "--config", str(path)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        sys.exit(f"adadpo-precompute-reference failed:\n{result.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=96, help="pairs in the data set")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--malloc-env", action="store_true",
                        help="run every child with glibc's allocator told to keep its memory")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # the child process
        print(json.dumps(child(args)))
        return
    env = {"OMP_NUM_THREADS": "1", **(MALLOC_ENV if args.malloc_env else {})}
    runs = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_model_and_data(Path(tmp), args.pairs)
        precompute(directory)
        for round_ in range(args.rounds):
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--variant", variant, "--dir", str(directory),
                       "--steps", str(args.steps)]
                runs[variant].append(run_child(cmd, variant, env))
                print(f"  round {round_ + 1} {variant:8s}: "
                      f"{statistics.median(runs[variant][-1]['times']):.2f} s/step",
                      file=sys.stderr, flush=True)
    allocator = ("glibc told to keep its memory (--malloc-env)" if args.malloc_env
                 else "glibc's defaults")
    print(f"{args.pairs} pairs, {PAIRS_PER_STEP} a step in micro-batches of {MICRO_PAIRS}, "
          f"max length {MAX_LENGTH}, {args.rounds} round(s) x {args.steps} timed steps, "
          f"one thread, {allocator}")
    print("| run | pairs/s | vs TRL | peak RSS MiB | vs TRL | tokens a micro-batch computes, "
          "mean / largest | CPU time in the kernel | minor faults (M) | first loss | reference "
          "log-prob sums (chosen, rejected) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    rows, churn = {}, {}
    for variant, results in runs.items():
        step = statistics.median(t for r in results for t in r["times"])
        rows[variant] = (PAIRS_PER_STEP / step, max(r["peak_rss_mib"] for r in results),
                         results[0]["losses"][0], results[0]["reference_sum"])
        computed = [n for r in results for n in r["computed"]]
        churn[variant] = (f"{statistics.mean(computed):.0f} / {max(computed)} | "
                          f"{statistics.median(r['kernel_share'] for r in results):.0%} | "
                          f"{statistics.median(r['minor_faults'] for r in results) / 1e6:.2f}")
    trl = rows.get("trl")
    for variant, (speed, rss, loss, sums) in rows.items():
        name = "TRL DPOTrainer" if variant == "trl" else f"adadpo-train, packing {variant}"
        if variant in BUDGETS:
            name = f"adadpo-train, packing pack, {BUDGETS[variant]}-token micro-batches"
        vs_speed = f"{speed / trl[0]:.2f}x" if trl else "-"
        vs_rss = f"{rss / trl[1]:.2f}x" if trl else "-"
        print(f"| {name} | {speed:.2f} | {vs_speed} | {rss:.0f} | {vs_rss} | {churn[variant]} | "
              f"{loss:.4f} | {sums[0]:.1f}, {sums[1]:.1f} |")
    ours = [v for v in rows if v != "trl"]
    if trl and ours:
        gap = max(abs(a - b) / max(1.0, abs(b)) for v in ours
                  for a, b in zip(rows[v][3], trl[3], strict=True))
        print(f"largest relative gap between the reference sums: {gap:.1e} "
              f"({'same work' if gap < 1e-4 else 'NOT the same work: check tokenisation'})")
    if not math.isfinite(sum(r[0] for r in rows.values())):
        sys.exit("a run measured no step")


if __name__ == "__main__":
    main()
