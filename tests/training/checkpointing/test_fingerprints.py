"""Fingerprints of a run's input files are cheap and write nothing (issue 23, items 4 and 8).

Before: a tokenizer's fingerprint read every file of its directory (a model.hf directory is
the tokenizer too: a 1.5 GB file beside it cost 1.4 GB of RSS per rank per start), weights
were hashed byte for byte, and the digest was remembered in a file written into the user's
model directory. The oracle for "reads no weights" is the kernel's count of bytes this
process read (/proc/self/io, rchar).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from adadpo_megatron.data.tokenizers import tokenizer_digest
from adadpo_megatron.training.checkpointing.fingerprints import safetensors_header, weights_digest
from tests.support.distributed import run_distributed

GIB = 1024**3


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _model_directory(path: Path) -> Path:
    """A Hugging Face-like directory: config.json, tokenizer files, a 1 GiB safetensors file
    (a real header, sparse data: no disk used) and an unrelated 1 GiB file beside them."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (path / "tokenizer_config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [GIB // 4],
                               "data_offsets": [0, GIB]}}).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + GIB)
    with open(path / "training_log.bin", "wb") as f:
        f.truncate(GIB)
    return path


def test_fingerprints_read_no_weights_and_write_nothing(tmp_path):
    model = _model_directory(tmp_path / "model")
    before_files = sorted(p.name for p in model.iterdir())
    start = _bytes_read()
    weights, tokenizer = weights_digest(model), tokenizer_digest(model)
    read = _bytes_read() - start
    assert read < 1024 * 1024, f"read {read} bytes of a directory holding 2 GiB"
    assert sorted(p.name for p in model.iterdir()) == before_files, "wrote into the model"
    assert weights_digest(model) == weights and tokenizer_digest(model) == tokenizer

    # what identifies them changes with them: a tokenizer file's bytes; a weight file's
    # modification time (a retrain writes it again) or header
    (model / "tokenizer_config.json").write_text('{"eos_token": "a"}')
    assert tokenizer_digest(model) != tokenizer and weights_digest(model) == weights
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert weights_digest(model) != weights


def test_a_truncated_safetensors_header_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"w": ')
    with pytest.raises(ValueError, match=rf"{path}: not a whole safetensors file .* truncated"):
        safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(ValueError, match=rf"{path}: its safetensors header is not JSON"):
        safetensors_header(path)


def _rank_zero_worker(rank, world, out):
    from adadpo_megatron.training.process_groups import computed_on_rank_zero

    value = computed_on_rank_zero(lambda: f"computed on rank {rank}")
    try:
        computed_on_rank_zero(lambda: (_ for _ in ()).throw(FileNotFoundError("no such dir")))
        error = None
    except FileNotFoundError as err:
        error = str(err)
    torch.save((value, error), f"{out}.{rank}")


@pytest.mark.slow
def test_fingerprints_are_computed_on_one_rank_for_all(tmp_path):
    """What rank 0 computed (or the error it met) reaches every rank: only rank 0 reads."""
    run_distributed(_rank_zero_worker, 2, str(tmp_path / "out"))
    for rank in (0, 1):
        assert torch.load(f"{tmp_path / 'out'}.{rank}") == ("computed on rank 0", "no such dir")
