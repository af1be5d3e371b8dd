"""Preemption: SIGTERM / SIGINT turned into a flag the training loop polls, so a preempted
run saves a checkpoint and exits instead of dying mid-step."""

from __future__ import annotations

import signal
import threading
from typing import Any

from jaxpost import sharding


class PreemptionGuard:
    """Within the context, SIGTERM and SIGINT set `requested` instead of killing the process.

    The training loop polls `requested` after each step, saves a checkpoint and exits; a second
    signal of the same kind falls through to the previous handler (a stuck run can still be
    interrupted).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every process once any process got a signal (multi-process runs agree)."""
        return bool(sharding.agree_across_processes(self.requested is not None, "any"))
