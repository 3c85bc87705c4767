"""Helpers for the training-step tests: a tiny run config, full-parameter gathering."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "reverse_pairs.jsonl"

TINY = {
    "model": {"preset": "tiny", "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
              "num_query_groups": 2, "ffn_hidden_size": 64},
    "parallel": {},
    "loss": {"loss_type": "dpo", "beta": 0.5},
    "data": {"path": str(DATA), "seq_length": 24},
    "reference": {"mode": "resident"},
    # SGD makes "same parameters after a step" a statement about the gradients; Adam's
    # first step is lr * g / (|g| + eps), whose sign flips on float noise where g ~ 0.
    "optimizer": {"optimizer": "sgd", "lr": 0.5, "sgd_momentum": 0.0, "clip_grad": 1.0},
    "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 1, "seed": 7},
}


def tiny_depth(seq_length=24):
    """tolerances.forward_depth of TINY's model (the byte tokenizer's 259 ids padded to 384)."""
    from tests.support.tolerances import forward_depth

    model = TINY["model"]
    return forward_depth(model["num_layers"], model["hidden_size"], model["ffn_hidden_size"],
                         seq_length, 384)


def _tiny_sizes(history, seq_length):
    optimizer = TINY["optimizer"]
    return dict(beta=TINY["loss"]["beta"], lr=optimizer["lr"], clip_grad=optimizer["clip_grad"],
                seq=seq_length, depth=tiny_depth(seq_length),
                batch_tokens=2 * int(history[0]["pairs"]) * seq_length)


def tiny_training_gaps(history, seq_length=24, **overrides):
    """tolerances.dpo_training_gaps of a TINY run: how far two layouts' metrics and weights
    may be apart, from the metrics of one of them."""
    from tests.support.tolerances import dpo_training_gaps

    return dpo_training_gaps(history, **{**_tiny_sizes(history, seq_length), **overrides})


def tiny_eval_gaps(history, metrics, seq_length=24, **overrides):
    """{"eval/" metric: gap} of a TINY run's evaluation after the training steps of
    ``history`` (tolerances.dpo_step_gaps from the weights' gap those steps leave; the loss
    moves through the sums, its own gradient being unmeasured)."""
    from tests.support.tolerances import dpo_curvature, dpo_step_gaps, dpo_sum_sensitivity

    sizes = {**_tiny_sizes(history, seq_length), **overrides}
    _, weights = tiny_training_gaps(history, seq_length, **overrides)
    del sizes["lr"], sizes["clip_grad"]  # the training steps' own, used above
    g = history[0]["grad_norm"]
    m = {key.removeprefix("eval/"): value for key, value in metrics.items()}
    gaps = dpo_step_gaps(m, weights, curvature=dpo_curvature(g),
                         sensitivity=dpo_sum_sensitivity(sizes["beta"], g,
                                                         int(history[0]["pairs"])), **sizes)
    return {f"eval/{key}": value for key, value in gaps.items() if key != "weights"}


def tiny_config(overrides=None, **section_overrides):
    """A RunConfig from TINY with {"section.key": value} overrides. Its output_dir is a fresh
    temporary directory unless one is given: runs lock their output_dir, and two test runs on
    one machine must not share one."""
    import atexit
    import shutil
    import tempfile

    from adadpo_megatron.training.run_config import RunConfig

    raw = copy.deepcopy(TINY)
    raw["train"]["output_dir"] = tempfile.mkdtemp(prefix="adadpo-test-")
    # removed when this process ends (a spawned worker's too): nothing is left in /tmp
    atexit.register(shutil.rmtree, raw["train"]["output_dir"], ignore_errors=True)
    for key, value in {**(overrides or {}), **section_overrides}.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return RunConfig.from_dict(raw)


def _unshard(pieces, dim, stride):
    """Inverse of megatron's stride-aware split: rank r holds chunks r, r + tp, ... ."""
    per_rank = [torch.chunk(p, stride, dim=dim) for p in pieces]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(len(pieces))],
                     dim=dim)


def gather_full_parameters(trainer):
    """{global name: full tensor} on every rank, from this layout's shards.

    Tensor-parallel shards are all-gathered and reassembled; pipeline stages and virtual
    chunks are merged by global name. Data-parallel replicas are identical (checked).
    """
    from megatron.core import parallel_state

    from adadpo_megatron.mcore.parameter_names import global_parameter_names

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    local = {}
    for chunk in trainer.model:
        for name, param in global_parameter_names(chunk.module):
            value = param.detach().clone()
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                pieces = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(pieces, value.contiguous(), group=tp_group)
                value = _unshard(pieces, param.partition_dim, getattr(param, "partition_stride", 1))
            local[name] = value
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    merged = {}
    for rank_params in everyone:
        for name, value in rank_params.items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0,
                                           msg=f"replicas of {name} differ")
            merged[name] = value
    return merged


def run_steps(config, steps=1):
    """Set up a trainer, run ``steps`` steps; (metrics of each step, full parameters)."""
    from adadpo_megatron.training.trainer import Trainer

    trainer = Trainer(config).setup()
    try:
        history = [trainer.train_step(s) for s in range(steps)]
        # metrics are complete on the last pipeline stage; share them with every rank
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, history)
        history = max(everyone, key=lambda h: len(h[0]))
        return history, gather_full_parameters(trainer)
    finally:
        trainer.close()


def free_port() -> int:
    """A TCP port nobody listens on now, for a subprocess's MASTER_PORT (two test runs on one
    machine must not collide on a fixed one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
