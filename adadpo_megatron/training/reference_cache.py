"""Precomputed reference log-probs: the cache file, its fingerprint, and looking them up.

The cache stores, per pair, keyed by its row in the source (``example_ids``: rows skipped
as invalid leave gaps), the reference's sums of response-token log-probs and the
response-token counts for the chosen and rejected sequences, a checksum of those tensors, and
a fingerprint of everything they depend on: the reference model (architecture, dtype and
what identifies its initial weights: checkpointing.fingerprints), the tokenizer, the
truncation settings, the data file's contents and LD-DPO's ld_alpha. Training recomputes
the fingerprint and refuses a cache whose fingerprint differs, naming the parts that changed;
checks that every loaded pair's row is in the cache with the same token counts; and refuses a
file whose checksum does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from adadpo_megatron.data.preference_data import PreferenceDataset
from adadpo_megatron.micro_batch import MicroBatch
from adadpo_megatron.training.checkpointing.fingerprints import source_fingerprints

CACHE_FORMAT = "adadpo-reference-logps-v2"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_fingerprint(config, tokenizer, dataset: PreferenceDataset,
                          sources: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Per-part digests; a cache is valid only if every part matches. ``sources``: the run's
    ``source_fingerprints`` when already known (computed once, on one rank)."""
    weights = reference_weights_path(config)
    if weights is not None or config.model.hf:
        if sources is None:

            sources = source_fingerprints(config)
    if weights is None and config.model.hf:  # imported from a Hugging Face directory
        init = {"kind": "hf", "weights": sources["model.hf"]}
    elif weights is None:  # the policy's initial weights: canonical init from this seed
        init = {"kind": "canonical", "seed": config.train.seed}
    else:
        # what identifies the files (sizes, mtimes, metadata), not the path: a checkpoint
        # retrained in place is another one
        key = "reference.load" if config.reference.load else "model.load"
        init = {"kind": "checkpoint", "weights": sources[key]}
    # the base's architecture: LoRA's adapters are switched off in the reference (and a cache
    # of the base serves any adapters on it)
    architecture = {k: v for k, v in dataclasses.asdict(config.model).items()
                    if k not in ("load", "lora")}
    reference_model = {"model": architecture, "dtype": config.train.dtype, "init": init}
    parts = {
        "reference_model": _digest(reference_model),
        "tokenizer": _digest(tokenizer.fingerprint()),
        # what tokenising read (the same dict, so the same digest, as before DataSettings)
        "truncation": _digest(dataclasses.asdict(config.data.settings())),
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


def eval_cache_path(config) -> Path:
    """The precomputed reference of data.eval_path's pairs: beside the training pairs' cache,
    ``<cache>.eval.pt`` (the two sets' source rows overlap)."""
    path = default_cache_path(config)
    return path.with_name(path.name.removesuffix(".pt") + ".eval.pt")


def _checksum(example_ids: torch.Tensor, logps: torch.Tensor, counts: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (example_ids.long(), logps.float(), counts.float()):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_cache(path: Path, fingerprint: Dict[str, str], example_ids: torch.Tensor,
               logps: torch.Tensor, counts: torch.Tensor) -> None:
    """Writes atomically: a killed write never leaves a half-written cache behind.

    Args:
        example_ids: [N] long, each pair's row in the source.
        logps: [N, 2] float32 reference sums (chosen, rejected), in the order of example_ids.
        counts: [N, 2] float32 response-token counts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # reference.cache_path's folder may be new
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    example_ids, logps, counts = example_ids.long(), logps.float(), counts.float()
    torch.save({"format": CACHE_FORMAT, "fingerprint": fingerprint, "example_ids": example_ids,
                "logps": logps, "counts": counts,
                "checksum": _checksum(example_ids, logps, counts)}, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> dict:
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"reference cache {path} cannot be read ({type(err).__name__}: "
                         f"{err}); it is truncated or not a cache: rerun "
                         "adadpo-precompute-reference") from err
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT:
        found = cache.get("format") if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(f"{path} is not a reference cache of format {CACHE_FORMAT} (found "
                         f"{found!r}); rerun adadpo-precompute-reference")
    try:
        intact = cache["checksum"] == _checksum(cache["example_ids"], cache["logps"],
                                                cache["counts"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"reference cache {path} is incomplete ({err}); rerun "
                         "adadpo-precompute-reference") from err
    if not intact:
        raise ValueError(f"reference cache {path} is corrupted: its contents do not match the "
                         "checksum stored with them; rerun adadpo-precompute-reference")
    return cache


def load_cache(path: Path, fingerprint: Dict[str, str], dataset: PreferenceDataset
               ) -> torch.Tensor:
    """The reference sums of every loaded pair, indexed by source row: [max row + 1, 2]
    (NaN for rows not loaded), after checking the checksum, the fingerprint, and that every
    loaded pair's row is in the cache with the same response-token counts.

    Raises:
        FileNotFoundError: no cache (run adadpo-precompute-reference first).
        ValueError: an unreadable, corrupted or stale cache, naming the file and the parts
            whose fingerprint changed, or the first row that does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference cache {path} does not exist; run adadpo-precompute-reference with the "
            "same config first, or set reference.mode=resident")
    cache = _read(path)
    stale = sorted(k for k in set(fingerprint) | set(cache["fingerprint"])
                   if cache["fingerprint"].get(k) != fingerprint.get(k))
    if stale:
        raise ValueError(
            f"reference cache {path} is stale: its {', '.join(stale)} fingerprint"
            f"{'s differ' if len(stale) > 1 else ' differs'} from this run's (cache "
            f"{ {k: cache['fingerprint'].get(k) for k in stale} }, run "
            f"{ {k: fingerprint.get(k) for k in stale} }); rerun adadpo-precompute-reference")
    rows = int(max(int(dataset.example_ids.max()), int(cache["example_ids"].max()))) + 1
    by_row = torch.full((rows, 2), float("nan"))
    counts_by_row = torch.full((rows, 2), float("nan"))
    by_row[cache["example_ids"]] = cache["logps"]
    counts_by_row[cache["example_ids"]] = cache["counts"]
    expected_counts = (dataset.labels != -100).sum(-1).float()
    got = counts_by_row[dataset.example_ids]
    wrong = (got != expected_counts).any(-1).nonzero()
    if wrong.numel():
        i = int(wrong[0, 0])
        row = int(dataset.example_ids[i])
        what = ("is not in the cache" if torch.isnan(got[i]).any() else
                f"has {got[i].tolist()} response tokens in the cache but "
                f"{expected_counts[i].tolist()} in the data")
        raise ValueError(f"reference cache {path} does not match the data: row {row} {what} "
                         f"({wrong.shape[0]} such pairs); rerun adadpo-precompute-reference")
    return by_row


def attach_precomputed(batches: List[MicroBatch], ref_logps: torch.Tensor) -> None:
    """Sets each micro-batch's ``ref_logps`` [2m] (chosen first) from ``load_cache``'s
    by-row table, by each pair's source row (``example_ids``)."""
    for batch in batches:
        ids = batch["example_ids"]
        batch["ref_logps"] = torch.cat([ref_logps[ids, 0], ref_logps[ids, 1]])
