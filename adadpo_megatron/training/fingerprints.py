"""Content digests of weight directories, so that a checkpoint retrained in place (same path,
same metadata) is told apart from the one a cache or an import was made from.

Hashing a 70B checkpoint reads every byte once (minutes); the digest is then remembered in
``.adadpo_digest.json`` inside the directory, keyed by every file's size and modification
time, and read back while none of them changed. Where the directory is read-only it is
hashed on every start.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

MEMO = ".adadpo_digest.json"
_BLOCK = 16 * 1024 * 1024


def _files(directory: Path, keep: Optional[Callable[[Path], bool]]) -> Dict[str, list]:
    out = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == MEMO or (keep is not None and not keep(path)):
            continue
        stat = path.stat()
        out[path.relative_to(directory).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return out


def content_digest(directory, keep: Optional[Callable[[Path], bool]] = None) -> str:
    """sha256 over the names and bytes of the files under ``directory`` (those ``keep``
    accepts), remembered in the directory while no file's size or mtime changes."""
    directory = Path(directory)
    files = _files(directory, keep)
    memo_path = directory / MEMO
    try:
        memo = json.loads(memo_path.read_text())
        if memo.get("files") == files:
            return memo["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        with open(directory / name, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    value = digest.hexdigest()
    try:
        tmp = memo_path.with_name(f"{MEMO}.{os.getpid()}")
        tmp.write_text(json.dumps({"files": files, "digest": value}))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only directory: hashed again next time
    return value
