"""How the commands report what a person can fix: one line, exit code 2.

A user error (a path, a config key, a file, the disk, a directory in use) is one line,
``PROG: error: ...``, printed once: by global rank 0 when every rank met it (a verdict rank 0
reached and broadcast, marked ``on_every_rank``), else by the rank that met it, naming
itself. ADADPO_TRACEBACK=1 re-raises it instead, with its traceback, on every rank. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from adadpo_megatron.training.checkpointing.run_dir import RunDirectoryError

USER_ERRORS = (ValueError, OSError, RunDirectoryError)
TRACEBACK = "ADADPO_TRACEBACK"


def rank() -> int:
    """This process's global rank as the launcher set it (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def fail(prog: str, err: BaseException, code: int = 2) -> NoReturn:
    """Exits with ``code`` after ``err`` as one line (module docstring)."""
    if os.environ.get(TRACEBACK) == "1":
        raise err
    text = (f"{' '.join(str(err).split()) or type(err).__name__} ({TRACEBACK}=1 shows "
            "where)")
    if getattr(err, "on_every_rank", False):
        error_line(prog, text, code)
    if rank():
        text = f"rank {rank()}: {text}"
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(code)


def error_line(prog: str, text: str, code: int = 2) -> NoReturn:
    """Exits with ``code`` after ``PROG: error: text``, printed by rank 0 alone (an error every
    rank meets alike, such as a bad config)."""
    if rank() == 0:
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(code)
