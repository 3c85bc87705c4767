"""Stopping a run cleanly: at preemption (SIGTERM, SIGINT) or before a wall-time budget ends.

The first SIGTERM or SIGINT only records the request. Every rank reports its request in the
one flag all-reduce each step already makes (adadpo_megatron.training.trainer), so all ranks
agree on the same step: they finish it, save a checkpoint together and exit with
PREEMPTED_EXIT_CODE. A second signal exits at once (128 + the signal's number), saving
nothing. ``train.exit_after_minutes`` makes the same request when the budget has run out, so
a job stops with a checkpoint before the scheduler's time limit kills it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

# EX_TEMPFAIL (sysexits.h): "try again later". Requeue scripts key on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """This process's reason to stop, if any: a signal, or the wall-time budget."""

    def __init__(self, exit_after_minutes: Optional[float] = None):
        self.reason: Optional[str] = None
        self._deadline = (time.monotonic() + 60.0 * exit_after_minutes
                          if exit_after_minutes else None)
        self._budget = exit_after_minutes
        self._previous = {}

    def install(self) -> None:
        """Takes over SIGTERM and SIGINT (in the main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and self.reason.startswith("SIG"):
            os._exit(128 + signum)  # the second signal: now, without saving
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether this process wants to stop after the current step."""
        if self.reason is None and self._deadline is not None \
                and time.monotonic() >= self._deadline:
            self.reason = f"train.exit_after_minutes={self._budget:g} reached"
        return self.reason is not None
