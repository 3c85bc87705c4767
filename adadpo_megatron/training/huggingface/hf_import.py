"""Hugging Face models in: ``model.hf`` and ``adadpo-import-hf``.

    adadpo-import-hf /models/Llama-3.1-8B-Instruct ckpt/llama31_8b            # one process
    torchrun --nproc_per_node 8 -m adadpo_megatron.training.huggingface.hf_import \\
        /models/Llama-3.3-70B-Instruct ckpt/llama33_70b --pp 8                 # 1/8 each

The result is a megatron-core torch_dist checkpoint of the model's weights, keyed by global
tensor names, so it loads on any TP/PP/VPP layout (``model.load``). Each process builds only
its own shard of the layout it runs on and fills it from the safetensors one tensor at a time
(adadpo_megatron.mcore.hf_mapping): with 8 pipeline stages a 70B import needs an eighth of
the model per process.

OUT is written whole and renamed into place (output_dirs): it may not be, hold or lie inside
the source, and an existing non-empty OUT that is not an earlier import is replaced only with
``--overwrite``.

``model.hf: DIR`` in a run does the same on the run's own layout the first time, and caches
the checkpoint in ``<output_dir>/hf_import`` with the source's fingerprint, which later runs
(and resumes) load instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from adadpo_megatron.mcore import cpu_compat
from adadpo_megatron.mcore.hf_mapping import load_hf_weights, read_architecture
from adadpo_megatron.mcore.model import build_model_chunks, transformer_config
from adadpo_megatron.mcore.model_config import ModelConfig, ParallelConfig
from adadpo_megatron.training.checkpointing.checkpoint import (
    load_model_weights,
    model_sharded_state_dict,
    save_sharded,
)
from adadpo_megatron.training.checkpointing.fingerprints import weights_digest
from adadpo_megatron.training.huggingface import output_dirs
from adadpo_megatron.training.process_groups import computed_on_rank_zero, init_distributed

IMPORT_DIR = "hf_import"
SOURCE_FILE = "hf_source.json"


def hf_fingerprint(directory) -> Dict[str, object]:
    """What identifies a Hugging Face model directory's weights without reading them
    (checkpointing.fingerprints.weights_digest: names, sizes, mtimes, safetensors headers,
    config.json and the index), so that weights replaced in place are noticed."""

    return {"weights": weights_digest(directory)}


def save_model_weights(chunks: List[torch.nn.Module], path: Path,
                       marker: Optional[Dict[str, object]] = None) -> None:
    """Writes the chunks' weights as a torch_dist checkpoint at ``path`` (every rank its
    shards; the base model's, without LoRA adapters), replacing what is there, atomically:
    written into a temporary sibling that rank 0 renames into place when every rank is done
    (output_dirs); a failure leaves ``path`` as it was. ``marker`` is saved as
    ``hf_source.json``."""

    path = Path(path)
    tmp, _ = output_dirs.siblings(path)  # the same name on every rank
    if dist.get_rank() == 0:
        output_dirs.fresh_sibling(path)
    dist.barrier()
    try:
        save_sharded(model_sharded_state_dict(chunks, "base"), tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            if marker is not None:
                (tmp / SOURCE_FILE).write_text(json.dumps(marker, indent=1))
            output_dirs.replace_directory(tmp, path)
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()


def import_into(chunks: List[torch.nn.Module], directory, cache: Path,
                fingerprint: Optional[Dict[str, object]] = None) -> None:
    """model.hf's weights into this rank's chunks: from ``cache`` when it was imported from
    the same source (``fingerprint``: its ``hf_fingerprint`` when already known), else from
    the safetensors (then cached)."""

    fingerprint = fingerprint or hf_fingerprint(directory)
    marker = Path(cache) / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text())["fingerprint"] == fingerprint:
        load_model_weights(chunks, str(cache))
        return
    load_hf_weights(chunks, directory, read_architecture(directory))
    save_model_weights(chunks, Path(cache), marker=_source(directory, fingerprint))


def _source(directory, fingerprint: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """What hf_source.json records: where the weights came from (so that adadpo-export-hf
    finds the architecture and tokenizer again) and the source's fingerprint."""
    return {"directory": str(Path(directory).resolve()),
            "fingerprint": fingerprint or hf_fingerprint(directory)}


def import_checkpoint(directory, out, *, tp: int = 1, pp: Optional[int] = None,
                      overwrite: bool = False) -> Path:
    """adadpo-import-hf: ``directory``'s weights as a torch_dist checkpoint at ``out``, built
    on a TP x PP layout of this world (pp defaults to the world size over tp). ``out`` may
    not be, hold or lie inside ``directory``; a non-empty ``out`` that is not an import
    (no hf_source.json) is replaced only with ``overwrite``.

    Raises:
        ValueError: on every rank alike, for an ``out`` refused so (output_dirs).
    """
    gpu = torch.cuda.is_available()
    arch = read_architecture(directory)
    init_distributed(gpu)
    with contextlib.ExitStack() as held:  # rank 0 holds OUT's lock until OUT is written
        out = _checked_out(directory, out, overwrite, held)
        _import(directory, out, arch, tp, pp, gpu)
    return out


def _import(directory, out: Path, arch, tp: int, pp: Optional[int], gpu: bool) -> None:
    from megatron.core import parallel_state  # megatron-core: imported on use

    world = dist.get_world_size()
    pp = pp or world // tp
    if tp * pp != world:
        raise ValueError(f"--tp {tp} x --pp {pp} != WORLD_SIZE({world})")
    if arch.num_layers % pp:
        raise ValueError(f"{directory}: {arch.num_layers} layers are not divisible by --pp {pp}")
    if not gpu:
        cpu_compat.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    try:
        model = ModelConfig.from_section({"hf": str(directory)})
        dtype = torch.bfloat16 if "bfloat16" in arch.dtype else torch.float32
        config = transformer_config(model, ParallelConfig(tp, pp), dtype=dtype, gpu=gpu)
        chunks = build_model_chunks(model, config, arch.vocab_size, 4096, gpu=gpu)
        load_hf_weights(chunks, directory, arch)
        # (the source's fingerprint once, on the rank that writes the marker)
        save_model_weights(chunks, out,
                           marker=_source(directory) if dist.get_rank() == 0 else None)
    finally:
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        print(f"wrote {out}: {arch.model_type}, {arch.num_layers} layers, vocabulary "
              f"{arch.vocab_size}; use it as model.load", flush=True)


def _checked_out(directory, out, overwrite: bool, held: contextlib.ExitStack) -> Path:
    """The resolved ``out``, checked on rank 0 before anything is built (output_dirs), whose
    lock rank 0 then holds in ``held``; every rank gets rank 0's verdict, so that all raise
    the same error or none does (a rank that went on alone would wait for the others
    forever)."""
    return Path(computed_on_rank_zero(lambda: str(held.enter_context(output_dirs.claimed(
        out, {"the source model": directory}, SOURCE_FILE, overwrite)))))
