"""Benchmark: what a forward keeps for the backward, per token, ours against transformers'.

    python benchmarks/bench_kept_activations.py     # CPU, one thread: ~1 minute

Activation memory is what a step's peak follows. On bench_vs_trl.py's model and data (a
tiny random Llama: hidden 256, 4 layers, FFN 688, 4 heads / 2 KV heads, vocabulary 512,
float32) this counts the bytes that the model's forward keeps for its backward: every
tensor torch.autograd.graph.saved_tensors_hooks sees, each storage once, weights excluded,
divided by the tokens of the forward. Ours is adadpo-train's first packed micro-batch
(data.packing pack, megatron-core's local layers with SDPADotProductAttention), with
megatron-core's fused SwiGLU function (the default) and with its unfused GLU
(model.bias_activation_fusion=false); transformers' LlamaForCausalLM (its SDPA attention)
runs the same weights on 8 rows of 1024 tokens. Each in a fresh process. Prints one
markdown table, the largest kept tensors of each by where they were saved.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

from child_run import run_child

VARIANTS = ("fused", "unfused", "transformers")


class Kept:
    """Storages the forward keeps for the backward: bytes, and bytes by the line saving them."""

    def __init__(self, weights):
        self.weights = weights
        self.storages, self.where = {}, collections.Counter()

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.weights and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                         if "autograd" not in f.filename and f.filename != __file__)
            self.where[f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"] += \
                storage.nbytes()
        return tensor

    def result(self, tokens: int) -> dict:
        return {"tokens": tokens, "bytes": sum(self.storages.values()),
                "where": self.where.most_common(6)}


def child_ours(directory: Path, fused: bool) -> dict:
    import torch
    from bench_vs_trl import our_config

    from adadpo_megatron.training.run_config import RunConfig
    from adadpo_megatron.training.trainer import Trainer

    config = our_config(directory, "pack", 1) if fused else unfused_config(directory)
    trainer = Trainer(RunConfig.from_dict(config)).setup()
    model = trainer.model[0]
    while hasattr(model, "module"):
        model = model.module
    kept = Kept({p.untyped_storage().data_ptr() for p in model.parameters()})
    results = []

    def first_forward(module, args, kwargs, output):
        if not results:
            tokens = kwargs.get("input_ids", args[0] if args else None)  # [b, s]
            results.append(kept.result(tokens.numel()))

    model.register_forward_hook(first_forward, with_kwargs=True)
    with torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
        trainer.train_step(0)
    trainer.close()
    return results[0]


def unfused_config(directory: Path) -> dict:
    """bench_vs_trl's pack run with megatron-core's unfused GLU, and its own reference cache
    (the model section is part of the reference's fingerprint)."""
    from bench_vs_trl import our_config

    config = our_config(directory, "pack", 1)
    config["model"]["bias_activation_fusion"] = False
    config["reference"]["cache_path"] = str(directory / "reference-unfused.pt")
    return config


def child_transformers(directory: Path) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory / "hf",
                                                              dtype=torch.float32)
    ids = torch.randint(0, 500, (8, 1024), generator=torch.Generator().manual_seed(0))
    kept = Kept({p.untyped_storage().data_ptr() for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    logits.float().sum().backward()
    return kept.result(ids.numel())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # the child process
        import torch

        torch.set_num_threads(1)
        directory = Path(args.dir)
        out = (child_transformers(directory) if args.variant == "transformers"
               else child_ours(directory, args.variant == "fused"))
        print(json.dumps(out))
        return
    from bench_vs_trl import make_model_and_data, precompute

    with tempfile.TemporaryDirectory() as tmp:
        directory = make_model_and_data(Path(tmp), 96)
        precompute(directory)
        precompute(directory, unfused_config(directory))
        runs = {v: run_child([sys.executable, __file__, "--variant", v, "--dir", str(directory)],
                             v, {"OMP_NUM_THREADS": "1"}) for v in VARIANTS}
    names = {"fused": "adadpo-train (megatron-core's fused SwiGLU, the default)",
             "unfused": "adadpo-train, model.bias_activation_fusion=false",
             "transformers": "transformers' LlamaForCausalLM"}
    print("| forward | tokens | kept for the backward, MiB | KiB per token |")
    print("| --- | ---: | ---: | ---: |")
    for variant, r in runs.items():
        print(f"| {names[variant]} | {r['tokens']} | {r['bytes'] / 2**20:.0f} | "
              f"{r['bytes'] / r['tokens'] / 1024:.1f} |")
    for variant, r in runs.items():
        print(f"\n{names[variant]}, KiB per token by where it was saved:")
        for where, nbytes in r["where"]:
            print(f"  {nbytes / r['tokens'] / 1024:6.1f}  {where}")


if __name__ == "__main__":
    main()
