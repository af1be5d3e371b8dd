"""The asyncio loop Orbax restores on, made to finish what a failed restore abandons.

Orbax runs a restore on a fresh event loop and closes it at the first failed array read, with
the other reads still pending; each leftover then prints a traceback after the caller's error
(see `_DrainingEventLoop`). `draining_restore_loops()` wraps a restore so its loop finishes
them first. `jaxpost.checkpoint` restores inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings

_DRAIN_SECONDS = 30.0  # per round; a cancelled read ends at once


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """The event loop Orbax gets for a restore (see `draining_restore_loops`).

    Orbax runs a restore on a fresh loop and closes it as soon as the first array read fails,
    with the other reads still pending. Left alone, each of those prints a traceback later, in
    arbitrary order after the one-line "checkpoint is corrupt" error: TensorStore's threads
    deliver results to the closed loop ("Event loop is closed"), tasks that never ran warn that
    their coroutine was never awaited, and tasks that failed report an exception nobody read.
    This loop cancels and finishes the abandoned tasks before it closes, drops results that
    reach it closed, and silences its reports about those tasks. A restore that succeeds leaves
    no task behind and is unaffected."""

    _abandoned = False

    def close(self) -> None:
        for _ in range(10):  # a cancelled task may start another before it ends
            if self.is_running() or self.is_closed():
                break
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if not pending:
                break
            self._abandoned = True
            for task in pending:
                task.cancel()
            self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def call_exception_handler(self, context) -> None:
        if not self._abandoned:
            super().call_exception_handler(context)


class _DrainingLoopPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def draining_restore_loops():
    """Loops created inside this context (Orbax's restore loop) are `_DrainingEventLoop`s."""
    with warnings.catch_warnings():  # Python 3.14 deprecates loop policies; 3.10-3.13 do not
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(_DrainingLoopPolicy())
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(previous)
