"""Runs one benchmark variant in a fresh Python process and reads back its JSON result line,
for the benchmarks that measure each variant alone (bench_logprobs, bench_step,
bench_packing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence


def run_child(cmd: Sequence[str], what: str, env: Optional[Dict[str, str]] = None) -> dict:
    """The last stdout line of ``cmd`` as JSON; exits naming ``what`` if the child fails."""
    result = subprocess.run(list(cmd), capture_output=True, text=True,
                            env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"})
    if result.returncode:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
