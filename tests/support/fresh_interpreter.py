"""Run a snippet in a fresh Python interpreter: for what depends on what this process has
already imported or switched on (import order, lazy imports, the CPU layer)."""

from __future__ import annotations

import subprocess
import sys


def assert_runs_clean(code: str, timeout: float = 300.0) -> None:
    """Runs ``code`` (which ends by printing "ok") with this interpreter in a new process;
    fails with its stderr unless it printed "ok"."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
