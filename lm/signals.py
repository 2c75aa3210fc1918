"""Stop requests (Ctrl-C, SIGTERM) for long-running commands: all in the main thread, no-ops elsewhere.

- `sigterm_as_interrupt()`: the first SIGTERM raises KeyboardInterrupt, as Ctrl-C does (`longconv` wraps
  every command in it; MQAR worker processes too).
- `interrupts_deferred()`: Ctrl-C and SIGTERM that arrive inside the scope act at its end, e.g. around a
  training step that donates its state (cut in the middle, the state is neither the old nor the new one)
  or a message on a pipe.
- `interrupts_kept()`: around a training loop. A KeyboardInterrupt that Python has to drop, because the
  signal's handler ran inside a garbage-collector callback or a finalizer (JAX registers one: "Exception
  ignored in: _xla_gc_callback"), is kept and raised again when the next `interrupts_deferred` scope
  starts (the next step), instead of being lost with the run going on.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


_kept: list[str] = []  # messages of the dropped KeyboardInterrupts not yet raised again
_kept_depth = 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within this scope the first SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C does) and
    restores the previous handler, so a second one acts as it would have. No-op off the main thread."""
    if not _main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred(repeat_acts_now: bool = True):
    """SIGINT and SIGTERM whose handler is a Python function are recorded inside this scope and passed to
    that handler when the scope ends (so KeyboardInterrupt is raised there, not inside). With
    ``repeat_acts_now`` the first one prints that the stop waits for the scope's end, and the same signal
    a second time goes to the handler at once (the user insists); keep it False where a cut must never
    happen, e.g. a message on a pipe. A KeyboardInterrupt kept by `interrupts_kept` is raised on entry.
    Ignored and default dispositions are left as they are. No-op off the main thread."""
    if not _main_thread():
        yield
        return
    if _kept:
        message = _kept[0]  # several dropped ones are one stop request
        _kept.clear()
        raise KeyboardInterrupt(f"{message} (it arrived during garbage collection; acting on it now)".lstrip())
    pending: list[tuple[int, object]] = []
    previous = {}

    def defer(signum, frame):
        if repeat_acts_now and any(s == signum for s, _ in pending):  # the same signal twice: act now
            pending.clear()
            previous[signum](signum, frame)
        else:
            if repeat_acts_now and not pending:
                print(f"{signal.Signals(signum).name}: stopping once the current step has ended; send it again to "
                      "stop at once (losing the steps since the last checkpoint)", file=sys.stderr, flush=True)
            pending.append((signum, frame))

    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = handler
            signal.signal(signum, defer)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in pending:
            previous[signum](signum, frame)


@contextlib.contextmanager
def interrupts_kept():
    """Within this scope a KeyboardInterrupt reported to `sys.unraisablehook` (raised where Python cannot
    propagate it: a gc callback, a finalizer) is kept, and the next `interrupts_deferred()` raises it on
    entry. Other unraisable exceptions go to the previous hook. Nests; no-op off the main thread."""
    global _kept_depth
    if not _main_thread():
        yield
        return
    previous = sys.unraisablehook

    def keep(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _kept.append(str(unraisable.exc_value or ""))
        else:
            previous(unraisable)

    sys.unraisablehook = keep
    _kept_depth += 1
    try:
        yield
    finally:
        _kept_depth -= 1
        sys.unraisablehook = previous
        if not _kept_depth:
            _kept.clear()  # the loop has ended: nothing left to stop
