"""Precompute the reference's log-probs over the whole data set, on any parallel layout.

The reference (the policy's initial weights) runs forward-only through megatron-core's
schedule with the same ReferenceForwardStep, planner and micro-batch builder as training
(data.packing, the token budget, the interleaved schedule's micro-batch multiple), a global
batch of pairs per schedule call, so the cached sums equal what the resident reference
computes in training up to float32 rounding. A call's last micro-batches may be fillers
(copies that pad it to what the schedule needs), which are not stored.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adadpo_megatron.training.reference_cache import (
    default_cache_path,
    eval_cache_path,
    reference_fingerprint,
    save_cache,
)
from adadpo_megatron.training.run import RunContext, setup_run
from adadpo_megatron.training.run_config import RunConfig


def precompute_reference(config: RunConfig) -> str:
    """Writes the reference cache for ``config``; returns its path (on every rank)."""
    run = setup_run(config)
    try:
        return _precompute(run)
    finally:
        run.close()


def _precompute(run: RunContext) -> str:
    """The training pairs' cache, and data.eval_path's beside it; the first's path."""
    reference = run.build_reference()
    path = _write(run, reference, run.data.dataset, default_cache_path(run.config))
    if run.config.data.eval_path is not None:
        _write(run, reference, run.data.eval_set, eval_cache_path(run.config))
    return path


def _write(run: RunContext, reference, dataset, path) -> str:
    config, step = run.config, run.reference_step()
    num = len(dataset)
    logps = torch.zeros(num, 2)
    counts = torch.zeros(num, 2)
    per_call = config.train.global_batch_size
    for start in range(0, num, per_call):
        plan = run.plan(dataset, range(start, min(num, start + per_call)), fill=True)
        batches = run.materialize(dataset, plan)
        reports = run.forward_only(step, reference, batches)
        if run.groups.is_last_stage:
            for micro_batch, report in zip(plan[run.groups.dp_rank], reports, strict=True):
                if micro_batch.filler:
                    continue
                m = len(micro_batch.pairs)
                sums, cnt = report["ref_logps"].cpu(), report["ref_counts"].cpu()
                for j, position in enumerate(micro_batch.pairs):
                    logps[position] = torch.stack([sums[j], sums[m + j]])
                    counts[position] = torch.stack([cnt[j], cnt[m + j]])
    # Every pair was computed on exactly one data-parallel rank of the last stage.
    if run.groups.is_last_stage:
        device = torch.device("cuda", torch.cuda.current_device()) if run.gpu else "cpu"
        both = torch.stack([logps, counts]).to(device)
        dist.all_reduce(both, group=run.groups.dp)
        logps, counts = both.cpu()
    if run.groups.is_logging_rank:
        fingerprint = reference_fingerprint(config, run.data.tokenizer, dataset,
                                            run.data.sources)
        # rows by position in the loaded data set, keyed by each pair's source row
        save_cache(path, fingerprint, dataset.example_ids, logps, counts)
        print(f"wrote reference log-probs of {num} pairs to {path}", flush=True)
    dist.barrier()
    return str(path)
