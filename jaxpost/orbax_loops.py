"""The asyncio loops Orbax reads and writes arrays on, made to finish what a failure abandons.

Orbax runs a restore, and each background save, on a fresh event loop and closes it at the
first failed array read or write (a corrupt file, a full disk), with the others still pending;
each leftover then prints a traceback around the caller's one-line error (see
`_DrainingEventLoop`). Inside `draining_orbax_loops()` the loops Orbax creates finish them
first; nobody else's loops change. `jaxpost.checkpoint.Checkpointer` holds it while it is open,
so its saves' background threads get such loops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
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


def _called_from_orbax() -> bool:
    """Whether the code asking asyncio for a new loop (past asyncio's own frames) is Orbax's."""
    frame = sys._getframe(2)  # past this function and the policy's new_event_loop
    while frame is not None and frame.f_globals.get("__name__", "").startswith("asyncio"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("orbax.")


@functools.cache
def _policy_class():
    """A policy that hands Orbax `_DrainingEventLoop`s and leaves everything else to the policy
    it replaces (every other caller's new loops, each thread's current loop), so user code's
    own asyncio loops are never affected. Made on first use: Python 3.14 deprecates the base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = asyncio.AbstractEventLoopPolicy

    class OrbaxDrainingPolicy(base):
        def __init__(self, previous):
            self.previous = previous

        def new_event_loop(self):
            if _called_from_orbax():
                return _DrainingEventLoop()
            return self.previous.new_event_loop()

        def get_event_loop(self):
            return self.previous.get_event_loop()

        def set_event_loop(self, loop):
            self.previous.set_event_loop(loop)

        # Child-process watchers (Unix, Python < 3.14) stay the previous policy's too.
        def get_child_watcher(self):
            return self.previous.get_child_watcher()

        def set_child_watcher(self, watcher):
            return self.previous.set_child_watcher(watcher)

    return OrbaxDrainingPolicy


_lock = threading.Lock()
_holders = 0
_previous = None  # the policy in place before the first holder


def _policy(value=None):
    """The process's event-loop policy; with `value`, set it (quiet on Python 3.14)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if value is None:
            return asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(value)
        return value


@contextlib.contextmanager
def draining_orbax_loops():
    """Inside this context the loops Orbax creates, in any thread, are `_DrainingEventLoop`s;
    every other loop is the previous policy's, as before.

    Holders may overlap (two open checkpointers, a restore inside one) and leave in any order:
    the previous policy comes back when the last one leaves."""
    global _holders, _previous
    with _lock:
        if _holders == 0:
            _previous = _policy()
            _policy(_policy_class()(_previous))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                if not sys.is_finalizing():  # (a holder collected at exit: nothing to restore)
                    _policy(_previous)
                _previous = None
