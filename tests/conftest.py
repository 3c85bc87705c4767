"""The suite's tokenised-data caches go to one temporary directory of this test run (not to
~/.cache, nor beside the shipped data); spawned ranks and subprocesses inherit it."""

from __future__ import annotations

import os
import shutil
import tempfile


def pytest_configure(config):
    if "ADADPO_CACHE_DIR" not in os.environ:
        os.environ["ADADPO_CACHE_DIR"] = tempfile.mkdtemp(prefix="adadpo-test-cache-")
        config.add_cleanup(lambda: shutil.rmtree(os.environ["ADADPO_CACHE_DIR"],
                                                 ignore_errors=True))
