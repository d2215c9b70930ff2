"""SIGTERM and SIGINT, held from the start and taken by one thread, so a stop is never lost or entered twice."""

from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold_stop_signals() -> None:
    """Block SIGTERM and SIGINT in this thread, and so in every thread it starts later.

    Call it before any thread starts (``main`` does, for ``run`` and ``watch``),
    native threads included; the signals then stay pending until
    ``wait_for_stop`` takes them. No Python handler runs, and none can deadlock: a
    handler that sets a ``threading.Event`` can be entered again by a second signal
    while the first still holds the Event's lock, and the main thread then waits on
    itself forever. ``timeout make run`` sends two SIGTERMs (one to the process
    group, one from make), and people press Ctrl-C twice.
    Signals that arrive after ``wait_for_stop`` returned stay pending and are ignored.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


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
