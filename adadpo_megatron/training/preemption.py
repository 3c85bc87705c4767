"""Stopping a run cleanly: at preemption (SIGTERM, SIGINT) or before a wall-time budget ends.

During set-up (minutes at 70B: loading, importing, building) there is nothing to save: a
SIGTERM or SIGINT stops the process at once with ``Preempted``, which the command turns into
PREEMPTED_EXIT_CODE, as a stop after a step, so that a requeue script treats both alike. Once
steps run, the first SIGTERM or SIGINT only records the request. Every rank reports its
request in the one flag all-reduce each step already makes (adadpo_megatron.training.trainer),
so all ranks agree on the same step: they finish it, save a checkpoint together and exit with
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


class Preempted(BaseException):
    """A stop signal during set-up, where nothing is to be saved: raised from the signal
    handler, and (like KeyboardInterrupt) not caught by ``except Exception``."""


class StopRequests:
    """This process's reason to stop, if any: a signal, or the wall-time budget.

    ``immediate`` (the trainer's set-up): a signal raises Preempted at once; otherwise (steps
    running) it is a request honoured after the step.
    """

    def __init__(self, exit_after_minutes: Optional[float] = None, immediate: bool = False):
        self.reason: Optional[str] = None
        self.immediate = immediate
        self._previous = {}
        self.start_budget(exit_after_minutes)

    def start_budget(self, exit_after_minutes: Optional[float]) -> None:
        """A wall-time budget of ``exit_after_minutes`` from now (None: none)."""
        self._deadline = (time.monotonic() + 60.0 * exit_after_minutes
                          if exit_after_minutes else None)
        self._budget = exit_after_minutes

    def install(self) -> None:
        """Takes over SIGTERM and SIGINT (in the main thread only: Python's rule); again
        installed, nothing changes."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.immediate:
            self.reason = name
            raise Preempted(f"{name} during set-up")
        if self.reason is not None and self.reason.startswith("SIG"):
            os._exit(128 + signum)  # the second signal: now, without saving
        self.reason = name

    def requested(self) -> bool:
        """Whether this process wants to stop after the current step."""
        if self.reason is None and self._deadline is not None \
                and time.monotonic() >= self._deadline:
            self.reason = f"train.exit_after_minutes={self._budget:g} reached"
        return self.reason is not None
