"""The asyncio loops Orbax reads and writes arrays on, made to finish what a failure abandons.

Orbax runs a restore, and each background save, on a fresh event loop and closes it at the
first failed array read or write (a corrupt file, a full disk), with the others still pending;
each leftover then prints a traceback around the caller's one-line error (see
`_DrainingEventLoop`). Inside `draining_orbax_loops()` new loops finish them first.
`jaxpost.checkpoint.Checkpointer` holds it while it is open, so its saves' background threads
get such loops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings

_DRAIN_SECONDS = 30.0  # per round; a cancelled read ends at once


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """The event loop Orbax gets for a restore or a save (see `draining_orbax_loops`).

    Orbax runs these on a fresh loop and closes it as soon as the first array read or write
    fails, with the others still pending. Left alone, each of those prints a traceback later,
    in arbitrary order around the one-line error ("checkpoint is corrupt", "saving a checkpoint
    failed"): TensorStore's threads deliver results to the closed loop ("Event loop is
    closed"), tasks that never ran warn that their coroutine was never awaited, and tasks that
    failed report an exception nobody read. This loop cancels and finishes the abandoned tasks
    before it closes, drops results that reach it closed, and silences its reports about those
    tasks. A restore or save that succeeds leaves no task behind and is unaffected."""

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


_lock = threading.Lock()
_holders = 0
_previous: asyncio.AbstractEventLoopPolicy | None = None


def _set_policy(policy) -> None:
    with warnings.catch_warnings():  # Python 3.14 deprecates loop policies; 3.10-3.13 do not
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(policy)


@contextlib.contextmanager
def draining_orbax_loops():
    """Loops created inside this context, by any thread, are `_DrainingEventLoop`s.

    Holders may overlap (two open checkpointers, a restore inside one) and leave in any order:
    the process's previous policy comes back when the last one leaves."""
    global _holders, _previous
    with _lock:
        if _holders == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _previous = asyncio.get_event_loop_policy()
            _set_policy(_DrainingLoopPolicy())
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _set_policy(_previous)
                _previous = None
