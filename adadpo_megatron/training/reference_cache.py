"""Precomputed reference log-probs: the cache file, its fingerprint, and looking them up.

The cache stores, per example (row of the data file), the reference's sums of response-token
log-probs and the response-token counts for the chosen and rejected sequences, with a
fingerprint of everything they depend on: the reference model (architecture, dtype and
initialisation or checkpoint), the tokenizer, the truncation settings and the data file's
contents. Training recomputes the fingerprint and refuses a cache whose fingerprint differs,
naming the parts that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List

import torch

from adadpo_megatron.data.micro_batches import Batch
from adadpo_megatron.data.preference_data import PreferenceDataset

CACHE_FORMAT = "adadpo-reference-logps-v1"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_fingerprint(config, tokenizer, dataset: PreferenceDataset) -> Dict[str, str]:
    """Per-part digests; a cache is valid only if every part matches."""
    weights = reference_weights_path(config)
    if weights is None and config.model.hf:  # imported from a Hugging Face directory
        from adadpo_megatron.training.hf_checkpoints import hf_fingerprint

        init = {"kind": "hf", **hf_fingerprint(config.resolve(config.model.hf))}
    elif weights is None:  # the policy's initial weights: canonical init from this seed
        init = {"kind": "canonical", "seed": config.train.seed}
    else:
        from adadpo_megatron.training.checkpoint import resolve_checkpoint

        weights = resolve_checkpoint(weights)
        metadata = weights / "metadata.json"
        init = {"kind": "checkpoint", "path": str(weights.resolve()),
                "metadata": hashlib.sha256(metadata.read_bytes()).hexdigest()
                if metadata.is_file() else None}
    architecture = {k: v for k, v in dataclasses.asdict(config.model).items() if k != "load"}
    reference_model = {"model": architecture, "dtype": config.train.dtype, "init": init}
    parts = {
        "reference_model": _digest(reference_model),
        "tokenizer": _digest(tokenizer.fingerprint()),
        "truncation": _digest({"seq_length": config.data.seq_length,
                               "max_prompt_length": config.data.max_prompt_length,
                               "prompt_truncation": config.data.prompt_truncation,
                               "format": config.data.format,
                               "skip_invalid": config.data.skip_invalid,
                               "split": config.data.split}),
        "data": dataset.content_hash[:16],
    }
    if config.loss.ld_alpha is not None:  # LD-DPO weights the reference's sums too
        parts["ld_alpha"] = _digest({"ld_alpha": config.loss.ld_alpha})
    return parts


def reference_weights_path(config):
    """The checkpoint the reference's weights come from, or None for the initialisation."""
    return config.resolve(config.reference.load or config.model.load)


def default_cache_path(config) -> Path:
    if config.reference.cache_path:
        return config.resolve(config.reference.cache_path)
    data = Path(config.data_source())
    if not data.is_file():
        raise ValueError(f"data.path={config.data.path!r} is not a file; set "
                         "reference.cache_path for the precomputed reference log-probs")
    return data.with_name(data.name + ".reference.pt")


def save_cache(path: Path, fingerprint: Dict[str, str], logps: torch.Tensor,
               counts: torch.Tensor) -> None:
    """Writes atomically: a killed write never leaves a half-written cache behind.

    Args:
        logps: [N, 2] float32 reference sums (chosen, rejected), row = example id.
        counts: [N, 2] float32 response-token counts.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format": CACHE_FORMAT, "fingerprint": fingerprint, "logps": logps,
                "counts": counts}, tmp)
    os.replace(tmp, path)


def load_cache(path: Path, fingerprint: Dict[str, str], dataset: PreferenceDataset
               ) -> torch.Tensor:
    """The [N, 2] reference sums, after checking the fingerprint and the token counts.

    Raises:
        FileNotFoundError: no cache (run adadpo-precompute-reference first).
        ValueError: a stale cache, naming the parts whose fingerprint changed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference cache {path} does not exist; run adadpo-precompute-reference with the "
            "same config first, or set reference.mode=resident")
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if cache.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a reference cache of format {CACHE_FORMAT}")
    stale = sorted(k for k in set(fingerprint) | set(cache["fingerprint"])
                   if cache["fingerprint"].get(k) != fingerprint.get(k))
    if stale:
        raise ValueError(
            f"reference cache {path} is stale: its {', '.join(stale)} fingerprint"
            f"{'s differ' if len(stale) > 1 else ' differs'} from this run's (cache "
            f"{ {k: cache['fingerprint'].get(k) for k in stale} }, run "
            f"{ {k: fingerprint.get(k) for k in stale} }); rerun adadpo-precompute-reference")
    expected_counts = (dataset.labels != -100).sum(-1).float()
    if cache["logps"].shape != (len(dataset), 2) or not torch.equal(cache["counts"],
                                                                    expected_counts):
        raise ValueError(f"reference cache {path} does not match the data's response tokens; "
                         "rerun adadpo-precompute-reference")
    return cache["logps"]


def attach_precomputed(batches: List[Batch], ref_logps: torch.Tensor) -> None:
    """Sets each micro-batch's ``ref_logps`` [2m] (chosen first) from the [N, 2] cache."""
    for batch in batches:
        ids = batch["example_ids"]
        batch["ref_logps"] = torch.cat([ref_logps[ids, 0], ref_logps[ids, 1]])
