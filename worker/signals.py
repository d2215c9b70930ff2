"""SIGTERM and SIGINT (and, for the worker, SIGHUP), held from the start and taken by one thread, so a stop is never
lost or entered twice."""

from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)


def hold_stop_signals(reload: bool = False) -> None:
    """Block SIGTERM and SIGINT (with ``reload``, SIGHUP too) in this thread, and so in every thread it starts later.

    Call it before any thread starts (``main`` does, for ``run`` and ``watch``),
    native threads included; the signals then stay pending until
    ``wait_for_stop`` takes them. No Python handler runs, and none can deadlock: a
    handler that sets a ``threading.Event`` can be entered again by a second signal
    while the first still holds the Event's lock, and the main thread then waits on
    itself forever. ``timeout make run`` sends two SIGTERMs (one to the process
    group, one from make), and people press Ctrl-C twice.
    Signals that arrive after ``wait_for_stop`` returned stay pending and are ignored.

    The worker holds SIGHUP as well (``reload``) and takes it with :func:`wait_for_signal`: it reloads the rules
    and goes on serving. SIGHUP's disposition is reset to the default first, because a signal that is ignored
    (``nohup``) is discarded even while blocked, and would never reach ``sigwait``.
    """
    held = STOP_SIGNALS
    if reload:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        held += RELOAD_SIGNALS
    signal.pthread_sigmask(signal.SIG_BLOCK, held)


def wait_for_signal() -> signal.Signals:
    """Wait for SIGTERM, SIGINT or SIGHUP, held with ``hold_stop_signals(reload=True)``; returns the one that came."""
    return signal.Signals(signal.sigwait(STOP_SIGNALS + RELOAD_SIGNALS))


def wait_for_stop(done: threading.Event | None = None, timeout: float | None = None) -> signal.Signals | None:
    """Wait for SIGTERM or SIGINT (held with ``hold_stop_signals``), for ``done``, or ``timeout`` seconds.

    Returns the signal that came, or None when ``done`` was set or the time ran out.
    """
    if done is None and timeout is None:
        return signal.Signals(signal.sigwait(STOP_SIGNALS))
    deadline = None if timeout is None else time.monotonic() + timeout
    while done is None or not done.is_set():
        step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if step <= 0:
            return None
        info = signal.sigtimedwait(STOP_SIGNALS, step)
        if info is not None:
            return signal.Signals(info.si_signo)
    return None
