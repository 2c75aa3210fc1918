"""Stop requests (Ctrl-C, SIGTERM) for long-running commands: all in the main thread, no-ops elsewhere.

- `sigterm_as_interrupt()`: the first SIGTERM raises KeyboardInterrupt, as Ctrl-C does (`longconv` wraps
  every command in it; MQAR worker processes too).
- `interrupts_deferred()`: Ctrl-C and SIGTERM that arrive inside the scope act at its end, e.g. around a
  training step that donates its state (cut in the middle, the state is neither the old nor the new one)
  or a message on a pipe.
"""

from __future__ import annotations

import contextlib
import signal
import threading


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
def interrupts_deferred():
    """SIGINT and SIGTERM whose handler is a Python function are recorded inside this scope and passed to
    that handler when the scope ends (so KeyboardInterrupt is raised there, not inside). Ignored and
    default dispositions are left as they are. No-op off the main thread."""
    if not _main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = handler
            signal.signal(signum, lambda s, frame: pending.append((s, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in pending:
            previous[signum](signum, frame)
