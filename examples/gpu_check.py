"""The single-GPU check: one H100 or H200, under 8 minutes, one summary table. Unlike the
other examples it checks internals, so it imports the package's modules directly.

    python examples/gpu_check.py [--skip-fp8] [--out gpu_check.json]

1. Per-token log-probs at vocabulary 128256, sequence 4096, 2 sequences, bf16 logits, forward
   and backward: this project's op, megatron-core's vocab_parallel_cross_entropy and, where
   installed, Transformer Engine's parallel cross-entropy; time and extra peak memory.
2. One AdaDPO training step of a 2-layer model with Llama-3-70B widths (hidden 8192, 64 heads,
   8 KV groups, FFN 28672, vocabulary 128256) through adadpo_megatron's trainer, in bf16 and
   again in FP8 (Transformer Engine, hybrid/delayed): step-0 loss (ln 2: the reference is the
   initial policy), finite loss after the step, the second step's time and the peak memory
   of both, through megatron-core's fused SwiGLU (torch.compile'd; on by default, as in
   Megatron-LM). SGD keeps the optimizer state small enough for one GPU next to
   the resident reference.
3. Packing (data.packing, issues 10 and 17): Transformer Engine's THD split for context
   parallelism against this project's torch version of it (the CPU tests' oracle); then two
   AdaDPO steps of a 2-layer model of Llama-3-8B widths on the shipped pairs packed as THD
   (PackedSeqParams; micro-batch 4 and 16, an explicit data.max_tokens_per_micro_batch, unfused
   and fused log-probs) against the same pairs padded to seq_length: the step-1 loss (after one
   update, so the backward counts too) equal to 1e-3 in bf16, every packed micro-batch one
   THD sequence ([1, tokens]) with over 95% real tokens, and both step times.
4. The loss family (issue 12): every loss type on CUDA in float32 against the CPU in float64,
   losses and gradients; LD-DPO and WPO through packed THD steps against padded ones.
5. Qwen3-MoE on Transformer Engine layers (issue 18): a tiny random Qwen3-MoE (transformers,
   float32) through model.hf, the experts as Transformer Engine linears, tokens dispatched by
   megatron-core's all-to-all dispatcher on NCCL: per-token log-probs against transformers'
   forward on the GPU (the CPU tests check the local layers and EP=2 over gloo).
6. LoRA on Transformer Engine layers (issue 18): a tiny Llama with adapters on all four
   linears (the norm-fused ones hand the adapters their normalised input) trains 2 steps with
   the adapters_off reference (step-0 loss ln 2), its checkpoint holds the adapters only, and
   adadpo-export-hf's merged model in transformers gives the trained policy's log-probs.
   (Sequence parallelism needs TP > 1; the CPU tests check the adapters' SP communication.)
7. Megatron-LM's pretrain() with the plug-in (issue 25; adadpo_megatron.integrations.megatron_lm)
   where the CPU suite cannot take it: Transformer Engine layers, bf16, NCCL, packed micro-batches
   as THD through Megatron-LM's external loader. A first pretrain() trains one iteration
   (SimPO, no reference) and saves; adadpo-precompute-reference computes the reference of that
   checkpoint (model.load) with adadpo's own GPU forward; a second pretrain() resumes it with
   AdaDPO on that cache, so its first iteration's policy is the reference: loss ln 2 (to 1e-3
   in bf16) if Megatron-LM's TE forward, its resume and adadpo's agree, then a finite step.
8. Context parallelism (issue 26): Transformer Engine's context-parallel attention (megatron-
   core's TEDotProductAttention, THD, cp_comm_type p2p and all_gather; every segment split by
   TE's thd_get_partitioned_indices) against the local context-parallel attention that CPU
   runs use (rows split by position, the block-diagonal mask), on one packed micro-batch,
   forward and backward (output and the gradients of q, k and v, gathered back to sequence
   order), bf16 against float32 to 2e-2 of the largest entry; CP 2 on 2 GPUs (NCCL takes one
   rank a GPU), on one GPU the same comparison without CP.
Not run by the test suite (it needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeats=5):
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def logprob_providers():
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from adadpo_megatron import vocab_parallel_logprobs  # megatron-core's TP group

    providers = {
        "adadpo": lambda logits, labels: vocab_parallel_logprobs(logits, labels,
                                                                 tp_group=dist.group.WORLD),
        "megatron": lambda logits, labels: -vocab_parallel_cross_entropy(
            logits, labels, tp_group=dist.group.WORLD),
    }
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

        providers["transformer_engine"] = lambda logits, labels: -parallel_cross_entropy(
            logits, labels, 0.0, False, dist.group.WORLD)
    except ImportError:
        pass
    return providers


def _measure_logprobs(name, fn, labels, grad, vocab):
    logits = (2 * torch.randn(*labels.shape, vocab, device="cuda")).to(torch.bfloat16)
    logits.requires_grad_()

    def step():
        logits.grad = None
        fn(logits, labels).backward(grad)

    try:
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"check": f"log-probs {name}", "ms": _timed(step), "peak_mib": extra,
                "result": "ok"}
    except (RuntimeError, TypeError, ValueError) as err:  # one provider, not the whole check
        return {"check": f"log-probs {name}", "ms": float("nan"), "peak_mib": float("nan"),
                "result": f"failed: {err}"[:120]}


def check_logprobs(rows):
    vocab, seq, batch = 128256, 4096, 2
    labels = torch.randint(0, vocab, (batch, seq), device="cuda")
    grad = torch.randn(batch, seq, device="cuda")
    for name, fn in logprob_providers().items():
        rows.append(_measure_logprobs(name, fn, labels, grad, vocab))
        torch.cuda.empty_cache()


def tiny_cpu_config(overrides):
    """configs/tiny_cpu.yaml with ``overrides``, its data found from any working directory
    (a config's relative paths start in the working directory)."""
    from adadpo_megatron.training.run_config import load_run_config

    data = REPO / "examples" / "data" / "reverse_pairs.jsonl"
    return load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"),
                           [f"data.path={data}", *overrides])


def step_overrides(fp8: bool):
    """check_step's overrides of configs/tiny_cpu.yaml."""
    overrides = [
        "model.preset=llama3-70b", "model.num_layers=2", "model.load=null",
        "model.make_vocab_size_divisible_by=128256",  # the byte tokenizer padded to 128256
        "data.seq_length=4096", "data.max_prompt_length=64", "train.dtype=bfloat16",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.max_steps=2",
        "train.progress=false", "train.tensorboard=false", "train.resume=never",
        f"train.output_dir={tempfile.mkdtemp()}", "optimizer.optimizer=sgd",
        "optimizer.lr=1e-5", "optimizer.min_lr=0.0",  # tiny_cpu.yaml's min_lr is above it
        "optimizer.use_distributed_optimizer=false",
    ]
    if fp8:
        overrides += ["model.fp8=hybrid", "model.fp8_recipe=delayed"]
    return overrides


def check_step(rows, fp8: bool):
    from megatron.core.utils import get_attr_wrapped_model

    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(tiny_cpu_config(step_overrides(fp8))).setup()
    # megatron-core's fused SwiGLU (torch.compile on the GPU), on by default as in Megatron-LM
    fused = get_attr_wrapped_model(trainer.model[0], "config").bias_activation_fusion
    torch.cuda.reset_peak_memory_stats()
    first = trainer.train_step(0)
    torch.cuda.synchronize()
    start = time.perf_counter()  # the second step: the first compiles the SwiGLU
    second = trainer.train_step(1)
    torch.cuda.synchronize()
    elapsed = 1e3 * (time.perf_counter() - start)
    ok = fused and abs(first["loss"] - math.log(2)) < 1e-3 and math.isfinite(second["loss"])
    rows.append({"check": f"70B-width 2-layer step, {'fp8' if fp8 else 'bf16'}",
                 "ms": elapsed, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                 "result": f"step-0 loss {first['loss']:.6f} (ln 2 = {math.log(2):.6f}), "
                           f"step-1 loss {second['loss']:.6f}, fused SwiGLU {fused}: "
                           f"{'ok' if ok else 'FAILED'}"})
    trainer.close()


def check_thd_split(rows):
    from adadpo_megatron.mcore.packed_attention import thd_partition_index

    g = torch.Generator().manual_seed(0)
    mismatches = []
    for cp in (2, 4):
        runs = (2 * cp) * torch.randint(1, 40, (9,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), runs.cumsum(0)]).to(torch.int32)
        total = int(cu[-1])
        for rank in range(cp):
            ours = thd_partition_index(cu, total, cp, rank)  # CPU: the torch version
            te = thd_partition_index(cu.cuda(), total, cp, rank)  # CUDA: Transformer Engine's
            if not torch.equal(ours.long(), te.long().cpu()):
                mismatches.append(f"cp {cp} rank {rank}")
    rows.append({"check": "THD split: torch vs Transformer Engine", "ms": float("nan"),
                 "peak_mib": float("nan"),
                 "result": "ok" if not mismatches else f"FAILED: {', '.join(mismatches)}"})


def packed_overrides(extra, loss_overrides=()):
    """_packed_vs_padded's overrides of configs/tiny_cpu.yaml for one variant."""
    return ["model.preset=llama3-8b", "model.num_layers=2", "model.load=null",
            "data.seq_length=2048", "data.max_prompt_length=64", "train.dtype=bfloat16",
            "train.global_batch_size=32", "train.micro_batch_size=4", "train.max_steps=2",
            "train.progress=false", "train.tensorboard=false", "train.resume=never",
            f"train.output_dir={tempfile.mkdtemp()}", "optimizer.optimizer=sgd",
            "optimizer.lr=0.05", "optimizer.use_distributed_optimizer=false",
            *loss_overrides, *extra]


PACKED_VARIANTS = (("thd", ["data.packing=pack"]),
                   ("thd_mbs16", ["data.packing=pack", "train.micro_batch_size=16"]),
                   ("thd_budget", ["data.packing=pack", "data.max_tokens_per_micro_batch=4096"]),
                   ("thd_fused", ["data.packing=pack", "model.fused_logprobs=true"]))
LOSS_VARIANTS = (("LD-DPO ", ("loss.ld_alpha=0.5",)),
                 ("WPO ", ("loss.use_weighting=true", "loss.adaptive=false")))


def _packed_vs_padded(rows, label, variants, loss_overrides=()):
    """Two steps of a 2-layer Llama-3-8B-width model per variant; every variant's step-1 loss
    against the padded one's."""
    from adadpo_megatron.mcore.model import uses_transformer_engine
    from adadpo_megatron.training.trainer import Trainer

    results = {}
    for name, extra in (("padded", ["data.packing=none"]), *variants):
        overrides = packed_overrides(extra, loss_overrides)
        trainer = Trainer(tiny_cpu_config(overrides)).setup()
        assert name == "padded" or trainer.run.packed_format == "thd", trainer.run.packed_format
        assert uses_transformer_engine(True), "these checks are of Transformer Engine's layers"
        # a packed THD micro-batch is one sequence of its segments end to end (issue 17)
        rows = max(b["tokens"].shape[0] for b in trainer.micro_batches(1)[0])
        trainer.train_step(0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        second = trainer.train_step(1)
        torch.cuda.synchronize()
        results[name] = (second["loss"], 1e3 * (time.perf_counter() - start),
                         second["data/real_token_fraction"], rows)
        trainer.close()
        torch.cuda.empty_cache()
    padded_loss, padded_ms, padded_real, _ = results["padded"]
    rows.append({"check": f"{label}padded step (data.packing=none)", "ms": padded_ms,
                 "peak_mib": float("nan"),
                 "result": f"step-1 loss {padded_loss:.5f}, real tokens {padded_real:.3f}"})
    for name, _ in variants:
        loss, ms, real, batch_rows = results[name]
        ok = abs(loss - padded_loss) < 1e-3 and batch_rows == 1 and real > 0.95
        rows.append({"check": f"{label}packed THD step ({name})", "ms": ms,
                     "peak_mib": float("nan"),
                     "result": f"step-1 loss {loss:.5f} vs padded {padded_loss:.5f}, real "
                               f"tokens {real:.3f}, {batch_rows} row(s) a micro-batch, "
                               f"{padded_ms / ms:.2f}x faster: {'ok' if ok else 'FAILED'}"})


def check_packed_step(rows):
    """THD at the default token budget (micro-batch 4), at micro-batch 16 (issue 17: the old
    planner padded that like `longest`), at an explicit budget, and with fused log-probs."""
    _packed_vs_padded(rows, "", PACKED_VARIANTS)


def check_loss_family(rows):
    """Every loss type on CUDA float32 against the CPU in float64 (per-pair losses and
    gradients), then LD-DPO (its tail mask on packed THD segments) and WPO (log sum p^2 from
    bf16 logits) through packed THD steps against padded ones."""
    from adadpo_megatron.ops.loss import preference_loss
    from adadpo_megatron.ops.loss_config import LOSS_TYPES, NOT_ADAPTIVE, LossConfig

    g = torch.Generator().manual_seed(0)
    pairs = 256
    nc = torch.randint(20, 2000, (pairs,), generator=g)
    nr = torch.randint(20, 2000, (pairs,), generator=g)
    pc = -(0.2 + 2.8 * torch.rand(pairs, generator=g, dtype=torch.float64)) * nc
    pr = -(0.2 + 2.8 * torch.rand(pairs, generator=g, dtype=torch.float64)) * nr
    rc, rr = pc + 3 * torch.randn(pairs, generator=g), pr + 3 * torch.randn(pairs, generator=g)
    worst, failed = 0.0, []
    for loss_type in LOSS_TYPES:
        cfg = LossConfig(loss_type=loss_type, beta=0.05, adaptive=loss_type not in NOT_ADAPTIVE,
                         label_smoothing=0.1 if loss_type in ("exo_pair", "robust") else 0.0)
        out = []
        for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
            a = pc.to(device, dtype).requires_grad_()
            b = pr.to(device, dtype).requires_grad_()
            ref = (rc.to(device, dtype), rr.to(device, dtype)) if cfg.needs_reference else ()
            losses, _ = preference_loss(a, b, nc.to(device), nr.to(device), *ref, config=cfg)
            grads = torch.autograd.grad(losses.sum(), (a, b), allow_unused=True,
                                        materialize_grads=True)
            out.append(torch.cat([losses.detach(), *grads]).double().cpu())
        error = ((out[1] - out[0]).abs() / (out[0].abs() + 1e-6)).max().item()
        worst = max(worst, error)
        if not (error < 1e-4 and torch.isfinite(out[1]).all()):
            failed.append(loss_type)
    rows.append({"check": f"{len(LOSS_TYPES)} loss types: CUDA fp32 vs CPU fp64",
                 "ms": float("nan"), "peak_mib": float("nan"),
                 "result": f"worst relative error {worst:.1e}: "
                           f"{'ok' if not failed else 'FAILED ' + ', '.join(failed)}"})
    for label, loss_overrides in LOSS_VARIANTS:
        _packed_vs_padded(rows, label, (("thd", ["data.packing=pack"]),), loss_overrides)


def _tiny_hf_run(tmp: Path, config, model_section=None, **train):
    """(transformers model, RunConfig) of a tiny random model of ``config`` (weights scaled so
    that logits and routing are far from uniform) saved under tmp / "hf", with 4 pairs."""
    import transformers

    from adadpo_megatron.training.run_config import RunConfig

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(4.0)
    model.save_pretrained(tmp / "hf")
    g = torch.Generator().manual_seed(0)
    with open(tmp / "pairs.jsonl", "w") as f:
        for _ in range(4):
            ids = torch.randint(0, 256, (300,), generator=g).tolist()
            f.write(json.dumps({"prompt_input_ids": ids[:100], "chosen_input_ids": ids[100:200],
                                "rejected_input_ids": ids[200:]}) + "\n")
    run = RunConfig.from_dict({
        "model": {"hf": str(tmp / "hf"), **(model_section or {})},
        "loss": {"loss_type": "dpo"},
        "data": {"path": str(tmp / "pairs.jsonl"), "tokenizer": "byte", "seq_length": 256,
                 "max_prompt_length": 128, "packing": "none"},
        "optimizer": {"optimizer": "sgd", "lr": train.pop("lr", 1e-6),  # > 0, as required
                      "use_distributed_optimizer": False},
        "train": {"global_batch_size": 2, "micro_batch_size": 2, "max_steps": 1,
                  "output_dir": str(tmp / "run"), "resume": "never", "progress": False,
                  "tensorboard": False, **train}})
    return model, run


def _policy_vs_transformers(trainer, model, label: str, rows) -> None:
    """The trainer's policy's per-token log-probs against ``model``'s (transformers, on the
    GPU), on the first 2 pairs."""
    from adadpo_megatron import vocab_parallel_logprobs  # megatron-core's TP group
    from adadpo_megatron.data.micro_batches import collate
    from adadpo_megatron.mcore.forward_step import _model_forward

    batch = collate(trainer.run.data.dataset, torch.arange(2))
    chunk = trainer.model[0].module.eval()
    with torch.no_grad():
        cuda = {k: v.cuda() for k, v in batch.items()}
        ours = vocab_parallel_logprobs(_model_forward(chunk, cuda), cuda["labels"])
        logits = model.cuda()(cuda["tokens"]).logits.float()
    theirs = torch.log_softmax(logits, -1).gather(
        -1, cuda["labels"].clamp(min=0)[..., None]).squeeze(-1)
    mask = cuda["labels"] != -100
    error = (ours - theirs)[mask].abs().max().item()
    ok = error < 5e-3  # float32 both sides; Transformer Engine may use TF32 GEMMs
    rows.append({"check": label, "ms": float("nan"), "peak_mib": float("nan"),
                 "result": f"max |log-prob difference| {error:.1e} over {int(mask.sum())} "
                           f"tokens: {'ok' if ok else 'FAILED'}"})


def qwen3_moe_config():
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=384, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6)


def lora_run():
    """check_lora's (model config, model section, train keys) for _tiny_hf_run."""
    import transformers

    return (transformers.LlamaConfig(
        vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
        {"lora": {"rank": 8, "alpha": 16}}, {"lr": 0.5, "max_steps": 2})


def check_qwen3_moe(rows):
    from adadpo_megatron.training.trainer import Trainer

    model, run = _tiny_hf_run(Path(tempfile.mkdtemp()), qwen3_moe_config())
    trainer = Trainer(run).setup()
    try:
        _policy_vs_transformers(trainer, model, "Qwen3-MoE (TE layers) vs transformers", rows)
    finally:
        trainer.close()


def check_lora(rows):
    """LoRA on Transformer Engine layers (issue 18): the adapters read the normalised input
    TE's norm-fused linear_qkv / linear_fc1 return (return_layernorm_output). A tiny Llama
    trains 2 steps with adapters on all four linears (adapters_off reference: step-0 loss
    ln 2), is exported merged (adadpo-export-hf) and compared with transformers on the
    merged model; the checkpoint must hold the adapters only."""
    import transformers

    from adadpo_megatron.mcore.model import uses_transformer_engine
    from adadpo_megatron.training.huggingface.dcp_reader import tensor_metadata
    from adadpo_megatron.training.huggingface.hf_export import export_checkpoint
    from adadpo_megatron.training.trainer import Trainer

    tmp = Path(tempfile.mkdtemp())
    config, section, train = lora_run()
    _, run = _tiny_hf_run(tmp, config, section, **train)
    trainer = Trainer(run).setup()
    try:
        history = trainer.train()  # saves the final checkpoint
        export_checkpoint(tmp / "run", tmp / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp / "merged",
                                                                   dtype=torch.float32)
        saved = tensor_metadata(tmp / "run" / "checkpoints" / "step_0000002")
        only_adapters = bool(saved) and all("_lora." in key for key in saved)
        first = history[0]["loss"]
        te = uses_transformer_engine(True)  # the layer spec is Transformer Engine's
        ok = abs(first - math.log(2)) < 1e-4 and only_adapters and te
        rows.append({"check": "LoRA (TE layers): step 0, checkpoint", "ms": float("nan"),
                     "peak_mib": float("nan"),
                     "result": f"step-0 loss {first:.6f} (ln 2), step-1 loss "
                               f"{history[1]['loss']:.6f}, checkpoint adapters only "
                               f"{only_adapters}, TE layers {te}: "
                               f"{'ok' if ok else 'FAILED'}"})
        _policy_vs_transformers(trainer, merged, "LoRA (TE layers) vs merged export", rows)
    finally:
        trainer.close()


MEGATRON_LM_JOB = REPO / "tests" / "integrations" / "megatron_lm_job.py"


def megatron_lm_runs(tmp: Path):
    """check_megatron_lm's run config file, the flags of its two pretrain() runs and their
    checkpoint directory."""
    import yaml

    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "loss": {"loss_type": "dpo", "beta": 0.1, "adaptive": True, "clip": 2.0},
        "data": {"path": str(REPO / "examples" / "data" / "reverse_pairs.jsonl"),
                 "tokenizer": "byte", "seq_length": 64, "packing": "pack"},
        "reference": {"mode": "precompute", "cache_path": str(tmp / "reference.pt")},
        "train": {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": 3, "seed": 3,
                  "dtype": "bfloat16", "output_dir": str(tmp / "unused")},
    }))
    save = tmp / "megatron-lm"
    flags = [  # the tiny preset as Megatron-LM flags, on Transformer Engine's layers
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128",
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--bf16",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "4",
        "--global-batch-size", "16", "--train-iters", "3", "--seed", "3", "--lr", "1e-4",
        "--lr-decay-style", "constant", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "259", "--transformer-impl", "transformer_engine",
        "--calculate-per-token-loss", "--eval-iters", "0", "--eval-interval", "10",
        "--log-interval", "1", "--save", str(save), "--save-interval", "1",
        "--adadpo-config", str(config)]
    first = [*flags, "--exit-interval", "1", "--adadpo-override", "loss.loss_type=simpo",
             "loss.beta=2.0", "loss.adaptive=false", "reference.mode=none"]
    second = [*flags, "--load", str(save), "--adadpo-override",
              f"model.load={save / 'iter_0000001'}"]
    return config, first, second, save


def check_megatron_lm(rows):
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp())
    config, first, second, save = megatron_lm_runs(tmp)
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher's own, not this process's group

    def pretrain(flags, record):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=1", str(MEGATRON_LM_JOB), *flags]
        result = subprocess.run(command, env={**env, "ADADPO_RECORD": str(record)},
                                capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise RuntimeError(f"pretrain() failed: {result.stderr[-400:]}")
        return [json.loads(line) for line in record.read_text().splitlines()]

    start = time.perf_counter()
    pretrain(first, tmp / "first.jsonl")
    precompute = [sys.executable, "-c", "import sys; from adadpo_megatron.training.cli import "
                  "precompute_main; precompute_main(sys.argv[1:])", "--config", str(config),
                  f"model.load={save / 'iter_0000001'}"]
    result = subprocess.run(precompute, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"adadpo-precompute-reference failed: {result.stderr[-400:]}")
    records = pretrain(second, tmp / "second.jsonl")
    elapsed = 1e3 * (time.perf_counter() - start)
    loss = records[0]["loss"]
    ok = (records[0]["iteration"] == 2 and abs(loss - math.log(2)) < 1e-3
          and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records))
    rows.append({"check": "Megatron-LM pretrain() + plug-in (TE, THD)", "ms": elapsed,
                 "peak_mib": float("nan"),
                 "result": f"resumed iteration 2 loss {loss:.6f} (ln 2 = {math.log(2):.6f}), "
                           f"{len(records)} iterations: {'ok' if ok else 'FAILED'}"})


CP_HEADS, CP_GROUPS, CP_HEAD_DIM = 8, 2, 64
# bf16 against float32 on the same bf16 inputs: Transformer Engine's kernels accumulate in
# float32 and round the probabilities and the output to bf16 (unit roundoff 2^-8 = 3.9e-3),
# so a few roundings of the largest entry; a wrong chunk or mask moves entries by their size
CP_TOLERANCE = 2e-2


def context_parallel_inputs(cp: int):
    """check_context_parallel's packed micro-batch: segment lengths (multiples of 2 x CP, the
    THD split's need), each token's segment, and bf16 q [T, heads, d], k and v
    [T, groups, d], the output's gradient [T, heads * d]; the same on every rank."""
    g = torch.Generator().manual_seed(0)
    lengths = (2 * cp) * torch.randint(8, 64, (6,), generator=g)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    total = int(lengths.sum())
    tensors = [torch.randn(total, CP_HEADS, CP_HEAD_DIM, generator=g),
               torch.randn(total, CP_GROUPS, CP_HEAD_DIM, generator=g),
               torch.randn(total, CP_GROUPS, CP_HEAD_DIM, generator=g),
               torch.randn(total, CP_HEADS * CP_HEAD_DIM, generator=g)]
    return lengths, segments, [t.to(torch.bfloat16) for t in tensors]


def cp_attention_config(cp: int, comm: str, dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=CP_HEADS * CP_HEAD_DIM,
                             num_attention_heads=CP_HEADS, num_query_groups=CP_GROUPS,
                             context_parallel_size=cp, cp_comm_type=comm,
                             attention_dropout=0.0, hidden_dropout=0.0,
                             bf16=dtype == torch.bfloat16, params_dtype=dtype)


def _run_and_gather(module_call, index, inputs, grad, total, group):
    """Forward and backward of one rank's tokens ``index`` of ``inputs`` (q, k, v, in the
    dtype to compute in); (output, dq, dk, dv) of all T tokens in sequence order, float32,
    gathered from every rank of ``group``."""
    index = index.cuda()
    local = [t.cuda()[index].requires_grad_() for t in inputs]
    out = module_call(*local)
    out.backward(grad.cuda()[index].to(out.dtype).reshape(out.shape))
    pieces = [out.detach()] + [t.grad for t in local]
    world = dist.get_world_size(group)
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(indices, index, group=group)
    gathered = []
    for piece in pieces:
        piece = piece.float().reshape(len(index), -1).contiguous()
        parts = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(parts, piece, group=group)
        full = piece.new_empty(total, piece.shape[1])
        for where, part in zip(indices, parts, strict=True):
            full[where.long()] = part
        gathered.append(full)
    return gathered


def context_parallel_setup(cp: int):
    """The worker's megatron-core state: its CP group, and the model-parallel RNG states,
    which megatron-core's attention forks on a GPU even without dropout (a trainer seeds
    them with model_parallel_cuda_manual_seed; so must a hand-built module)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0)
    return ps.get_context_parallel_group()


def context_parallel_worker(out_path: str):
    """One rank of check_context_parallel (torchrun, one GPU a rank; CP = the world)."""
    from megatron.core import parallel_state as ps
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import is_te_min_version

    from adadpo_megatron.mcore.context_parallel_attention import (
        ContextParallelDotProductAttention,
        chunk_positions,
    )
    from adadpo_megatron.mcore.packed_attention import (
        block_diagonal_causal_mask,
        packed_seq_params,
        thd_cu_seqlens,
        thd_partition_index,
    )

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = context_parallel_setup(cp)
    lengths, segments, (q, k, v, grad) = context_parallel_inputs(cp)
    total = len(segments)
    # the CPU path: rows [T, 1, ...] split by position, the block-diagonal mask by query rows
    mine = chunk_positions(total, cp, rank).cuda()
    mask = block_diagonal_causal_mask(segments[None].cuda())[:, :, mine]
    ours_attention = ContextParallelDotProductAttention(
        cp_attention_config(cp, "p2p", torch.float32), 1, AttnMaskType.causal, "self")
    ours = _run_and_gather(lambda *t: ours_attention(*(x.unsqueeze(1) for x in t), mask),
                           mine, [q.float(), k.float(), v.float()], grad, total, group)
    # Transformer Engine: THD, every segment split in 2 x CP chunks, cu_seqlens global
    cu = thd_cu_seqlens(segments[None]).cuda()
    thd = packed_seq_params({"cu_seqlens": cu, "max_seqlen": int(lengths.max())})
    index = thd_partition_index(cu, total, cp, rank)
    results = {}
    for comm in ("p2p", "all_gather"):
        if comm == "all_gather" and cp > 1 and not is_te_min_version("2.18"):
            results[comm] = "not run: Transformer Engine < 2.18 has no all_gather for THD"
            continue
        try:
            te = TEDotProductAttention(cp_attention_config(cp, comm, torch.bfloat16), 1,
                                       AttnMaskType.causal, "self", cp_comm_type=comm)
            theirs = _run_and_gather(
                lambda *t, te=te: te(*t, None, AttnMaskType.causal, packed_seq_params=thd),
                index, [q, k, v], grad, total, group)
        except Exception as err:  # noqa: BLE001 - one comm type's failure, the other's result
            results[comm] = f"FAILED: {err!r}"[:200]
            continue
        results[comm] = {name: ((a - b).abs().max() / b.abs().max()).item()
                         for name, a, b in zip(("output", "dq", "dk", "dv"), theirs, ours,
                                               strict=True)}
    if rank == 0:
        Path(out_path).write_text(json.dumps({"cp": cp, "errors": results}))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def check_context_parallel(rows):
    """Transformer Engine's context-parallel attention (p2p and all_gather, THD) against the
    local context-parallel attention (the CPU path) on one packed micro-batch, forward and
    backward, over CP = min(2, GPUs) ranks (NCCL takes one rank a GPU: one GPU checks the
    THD attention against the mask path without CP)."""
    import subprocess
    import sys

    cp = min(2, torch.cuda.device_count())
    out = Path(tempfile.mkdtemp()) / "cp.json"
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={cp}", __file__, "--context-parallel-worker", str(out)],
        env={**env, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}, capture_output=True, text=True,
        timeout=600)
    if result.returncode:
        raise RuntimeError(f"the CP worker failed: {result.stderr[-400:]}")
    errors = json.loads(out.read_text())["errors"]
    measured = [e for errs in errors.values() if isinstance(errs, dict) for e in errs.values()]
    failed = any(isinstance(errs, str) and errs.startswith("FAILED") for errs in errors.values())
    worst = max(measured) if measured and not failed else float("inf")
    text = "; ".join(f"{comm} " + (", ".join(f"{name} {e:.1e}" for name, e in errs.items())
                                   if isinstance(errs, dict) else errs)
                     for comm, errs in errors.items())
    rows.append({"check": f"CP {cp} attention: TE (p2p, all_gather) vs local",
                 "ms": 1e3 * (time.perf_counter() - start), "peak_mib": float("nan"),
                 "result": f"max error / max |x| {text}: "
                           f"{'ok' if worst < CP_TOLERANCE else 'FAILED'}"
                           + ("" if cp > 1 else " (one GPU: no CP exchange checked)")})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--context-parallel-worker", metavar="OUT",
                        help=argparse.SUPPRESS)  # check_context_parallel's ranks
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a GPU")
    if args.context_parallel_worker:
        context_parallel_worker(args.context_parallel_worker)
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    rows = []
    check_logprobs(rows)
    check_thd_split(rows)
    check_packed_step(rows)
    check_loss_family(rows)
    for check, name in ((check_qwen3_moe, "Qwen3-MoE (TE layers) vs transformers"),
                        (check_lora, "LoRA (TE layers)"),
                        (check_context_parallel, "CP attention: TE (p2p, all_gather) vs local"),
                        (check_megatron_lm, "Megatron-LM pretrain() + plug-in (TE, THD)")):
        try:
            check(rows)
        except Exception as err:  # noqa: BLE001 - one row per check, whatever breaks
            rows.append({"check": name, "ms": float("nan"), "peak_mib": float("nan"),
                         "result": f"FAILED: {err!r}"[:300]})
    check_step(rows, fp8=False)
    if not args.skip_fp8:
        try:
            check_step(rows, fp8=True)
        except (ValueError, ImportError, RuntimeError) as err:
            rows.append({"check": "70B-width 2-layer step, fp8", "ms": float("nan"),
                         "peak_mib": float("nan"), "result": f"not run: {err}"})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'check':<44}{'ms':>10}{'peak MiB':>11}  result")
    for r in rows:
        print(f"{r['check']:<44}{r['ms']:>10.1f}{r['peak_mib']:>11.0f}  {r['result']}")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
