"""lm.signals: deferred stop signals, and Ctrl-C that Python drops inside a gc callback kept for the next step."""

import gc
import os
import signal
import sys

import pytest

from lm.signals import interrupts_deferred, interrupts_kept, sigterm_as_interrupt


def drop_interrupt_in_gc(message="signal 15 (SIGTERM)"):
    """Raise KeyboardInterrupt inside a garbage-collector callback, as a signal handler does when the signal
    arrives while JAX's `_xla_gc_callback` runs: Python cannot propagate it and reports it as unraisable."""
    def raising(phase, info):
        if phase == "start":
            raise KeyboardInterrupt(message)

    gc.callbacks.append(raising)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(raising)


def test_dropped_interrupt_is_raised_at_the_next_deferred_scope():
    steps = []
    with interrupts_kept():
        with interrupts_deferred():
            steps.append(1)
        drop_interrupt_in_gc()  # lost without the scope: the loop would go on
        with pytest.raises(KeyboardInterrupt, match="SIGTERM.*garbage collection"):
            with interrupts_deferred():
                steps.append(2)  # never runs: the step is not started
        with interrupts_deferred():  # raised once
            steps.append(3)
    assert steps == [1, 3]


def test_without_the_scope_a_dropped_interrupt_is_only_reported(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    drop_interrupt_in_gc()
    with interrupts_deferred():
        pass
    assert seen == [KeyboardInterrupt]


def test_kept_scope_passes_other_unraisable_errors_on_and_restores_the_hook(monkeypatch):
    seen = []
    hook = lambda u: seen.append(u.exc_type)  # noqa: E731
    monkeypatch.setattr(sys, "unraisablehook", hook)
    with interrupts_kept():
        with interrupts_kept():  # nested: the inner scope's end leaves the outer one working
            pass

        def raising(phase, info):
            if phase == "start":
                raise ValueError("not an interrupt")

        gc.callbacks.append(raising)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(raising)
        drop_interrupt_in_gc()
    assert seen == [ValueError] and sys.unraisablehook is hook
    with interrupts_deferred():  # the loop ended: a kept interrupt does not leak into later code
        pass


def test_signal_inside_a_deferred_scope_acts_at_its_end():
    steps = []
    # Python's own Ctrl-C handler, as in a foreground process (a background job inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("after the signal")  # the scope's body runs to its end
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["after the signal"]


def test_the_same_signal_twice_in_a_deferred_scope_acts_at_once(capsys):
    """A second SIGTERM (or Ctrl-C) while a long step runs is the user insisting: it is not held back.
    The first one says so."""
    steps = []
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("first held back")
            assert "SIGTERM: stopping once the current step has ended; send it again" in capsys.readouterr().err
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("not reached")
    assert steps == ["first held back"]

    steps.clear()  # where a cut must never happen, both wait for the end of the scope
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        with interrupts_deferred(repeat_acts_now=False):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("message sent whole")
    assert steps == ["message sent whole"] and "stopping once" not in capsys.readouterr().err
