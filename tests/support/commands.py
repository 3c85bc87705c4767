"""Running the project's commands as a user does (a fresh process), and reading their errors."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from tests.support.training import REPO

TINY_CPU = [sys.executable, "-m", "adadpo_megatron", "--config",
            str(REPO / "configs" / "tiny_cpu.yaml")]


def command_env(**extra: str) -> dict:
    """This environment without a launcher's (so that a command starts its own process
    group, on a free port) or ADADPO_TRACEBACK, one thread, the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "ADADPO_TRACEBACK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run_command(command: Sequence[str], timeout: float = 600, **kw):
    """The finished process of ``command`` (stdout and stderr captured as text)."""
    return subprocess.run([str(part) for part in command], env=command_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(stderr: str, prog: str, *fragments: str) -> str:
    """The command's one error line, ``PROG: error: ...``, holding every fragment; no
    traceback (library warnings and megatron-core's own log lines may stand beside it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
