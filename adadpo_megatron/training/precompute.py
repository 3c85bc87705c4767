"""Precompute the reference's log-probs over the whole data set, on any parallel layout.

The reference (the policy's initial weights) runs forward-only through megatron-core's
schedule with the same ReferenceForwardStep and micro-batch shape the resident reference
uses in training, so the cached sums equal what the resident reference would compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adadpo_megatron.data.micro_batches import collate
from adadpo_megatron.training.reference_cache import (
    default_cache_path,
    reference_fingerprint,
    save_cache,
)
from adadpo_megatron.training.run import Run
from adadpo_megatron.training.run_config import RunConfig


def precompute_reference(config: RunConfig) -> str:
    """Writes the reference cache for ``config``; returns its path (on every rank)."""
    run = Run(config)
    run.setup_common()
    reference = run.build_reference()
    from megatron.core import parallel_state

    dataset, t = run.dataset, config.train
    per_round = t.micro_batch_size * run.dp_size
    num = len(dataset)
    logps = torch.zeros(num, 2)
    counts = torch.zeros(num, 2)
    for start in range(0, num, per_round):
        # the last round is padded with example 0; padded rows are not stored
        ids = [(start + i) if start + i < num else 0 for i in range(per_round)]
        mine = torch.tensor(ids[run.dp_rank * t.micro_batch_size:
                                (run.dp_rank + 1) * t.micro_batch_size])
        batches = [collate(dataset, mine)]
        with torch.no_grad():
            reports = run.run_schedule(run.reference_step, reference, batches,
                                           forward_only=True)
        if run.is_last_stage:
            m = t.micro_batch_size
            sums, cnt = reports[0]["ref_logps"], reports[0]["ref_counts"]
            for j, example in enumerate(mine.tolist()):
                if run.dp_rank * m + j + start < num:
                    logps[example] = torch.stack([sums[j], sums[m + j]])
                    counts[example] = torch.stack([cnt[j], cnt[m + j]])
    # Every example was computed on exactly one data-parallel rank of the last stage.
    if run.is_last_stage:
        group = parallel_state.get_data_parallel_group()
        device = torch.device("cuda", torch.cuda.current_device()) if run.gpu else "cpu"
        both = torch.stack([logps, counts]).to(device)
        dist.all_reduce(both, group=group)
        logps, counts = both.cpu()
    path = default_cache_path(config)
    if run.is_logging_rank:
        fingerprint = reference_fingerprint(config, run.tokenizer, dataset, run.sources)
        # rows by position in the loaded data set, keyed by each pair's source row
        save_cache(path, fingerprint, dataset.example_ids, logps, counts)
        print(f"wrote reference log-probs of {num} pairs to {path}", flush=True)
    dist.barrier()
    run.close()
    return str(path)
