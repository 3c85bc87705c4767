"""Cheap fingerprints of a run's input files: the tokenizer, model.hf, model.load, reference.load.

A 70B model directory holds 140 GB of weights; a run restarts many times and every rank used
to read it whole to tell whether it changed. These digests read only what identifies the files
without reading the weights:

    tokenizer   the bytes of the tokenizer's own files (tokenizer.json, its config, the special
                tokens map, vocab / merges / sentencepiece model, chat template): a few MB,
                never the other files of the directory (model.hf is often the tokenizer too)
    weights     every weight file's name, size and modification time, the safetensors
                headers (names, dtypes, shapes, offsets), and the bytes of the small files that
                describe them (config.json, the safetensors index, a torch_dist checkpoint's
                metadata.json and .metadata)

so that weights retrained or replaced in place are noticed (a new file has a new mtime),
while a copy of the same weights made elsewhere counts as a change too: resuming says so and
names the key to allow (train.resume_allow_changes). Nothing is written anywhere: the user's
model and data directories are read-only to this project. ``source_fingerprints`` is what a
run computes once, on one rank, and broadcasts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict

from adadpo_megatron.data.tokenizers import digest_parts, tokenizer_digest
from adadpo_megatron.training.checkpointing.checkpoint import resolve_checkpoint

# files that describe weights and are read whole (each at most a few MB)
_DESCRIPTORS = ("config.json", "metadata.json", ".metadata", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".distcp", ".bin", ".pt")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON).

    Raises:
        ValueError: the file is too short for its header, or the header is not JSON: it is
            truncated or not a safetensors file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(size) if 0 < size <= _MAX_HEADER else b""
    if len(header) != size:
        raise ValueError(f"{path}: not a whole safetensors file (its header is cut or "
                         "missing); the file is truncated or damaged")
    try:
        json.loads(header)
    except ValueError as err:
        raise ValueError(f"{path}: its safetensors header is not JSON ({err}); the file is "
                         "damaged") from None
    return header


def weights_digest(directory) -> str:
    """sha256 (16 hex digits) of what identifies the weights in ``directory`` (its files, not
    its subdirectories) without reading them: see the module docstring."""
    directory = Path(directory)
    parts = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        name = path.name
        if name in _DESCRIPTORS:
            parts += [name.encode(), path.read_bytes()]
        elif name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            parts.append(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            if name.endswith(".safetensors"):
                parts.append(safetensors_header(path))
    return digest_parts(parts)


def source_fingerprints(config) -> Dict[str, str]:
    """{config key: digest} of the run's input files that are set: data.tokenizer (a Hugging
    Face directory), model.hf, model.load, reference.load. What resuming compares, what the
    reference cache and the model.hf import cache are keyed by. Reads a few MB."""

    out: Dict[str, str] = {}
    for key, value, digest in (
            ("data.tokenizer", config.data.tokenizer, tokenizer_digest),
            ("model.hf", config.model.hf, weights_digest),
            ("model.load", config.model.load, weights_digest),
            ("reference.load", config.reference.load, weights_digest)):
        if not value or value == "byte":
            continue
        path = config.resolve(value)
        if key.endswith(".load"):
            path = resolve_checkpoint(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{key}={value!r}: no such directory ({path})")
        out[key] = digest(path)
    return out
