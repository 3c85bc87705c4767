"""Reads what an offline Weights & Biases run wrote: the records of its run-<id>.wandb file.

The file is W&B's transaction log, which ``wandb sync`` uploads: a 7-byte header (":W&B",
a 2-byte magic, a version byte), then LevelDB's log format (32 KiB blocks of chunks, each a
4-byte CRC, a 2-byte little-endian length and a type: 1 whole, 2 first, 3 middle, 4 last),
each record one protobuf ``wandb.proto.wandb_internal_pb2.Record``. The reader in the wandb
package moved into its Go service, so the tests read the file here (CRCs unchecked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List

BLOCK = 32768
HEADER = 7


def records(path) -> Iterator[object]:
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, chunks = HEADER, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(path) -> List[Dict[str, object]]:
    """Every logged step: {key: value}, with "_step"."""
    out = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            out.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item})
    return out


def config(path) -> Dict[str, object]:
    """The run's config: the run record's, then what config records update."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def run_id(path) -> str:
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise ValueError(f"{path} has no run record")
