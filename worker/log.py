"""structlog set-up: readable lines on a terminal, JSON lines otherwise.

Libraries that log through the standard library (paho-mqtt, amqtt) go through the
same renderer, so a JSON log stays one JSON object per line.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class PahoRetryNoise(logging.Filter):
    """Drop paho's "Client is not connected" and "failed to receive on socket".

    paho logs the first as an error after each failed reconnection attempt. The worker already
    logs "broker unreachable, retrying" then, and the events it publishes meanwhile wait
    in paho's queue until the broker is back: nothing is wrong that the log must show.
    The worker's own line on the disconnect or failed handshake carries the second's error.
    """

    NOISE = ("Client is not connected", "failed to receive on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("paho") and record.getMessage().startswith(self.NOISE))


class _LibraryHandler(logging.StreamHandler):
    """The root handler this module installs; a second set-up replaces it."""


def setup_logging(level: str = "info", fmt: str = "auto", stream=None) -> None:
    """Configure structlog once for the process. ``fmt``: auto, json or console."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = _LibraryHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.add_log_level, stamp],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(PahoRetryNoise())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries log less verbosely than the worker.
    root.setLevel(max(LEVELS[level], logging.WARNING))
    # Python warnings (a library's deprecation, a decoder's complaint) become log records, not stray stderr text.
    logging.captureWarnings(True)


def get_logger(name: str = "emotion-worker"):
    return structlog.get_logger(name)


class Throttled:
    """One log line per burst of a repeated event: the first at once, then at most one every ``interval_s``.

    Each line says how many occurrences it stands for (``count``), broken down ``by_<key>`` when
    occurrences name one (a topic, a device), the ``static`` fields, and the fields of the latest
    occurrence. Occurrences after the last line are logged ``interval_s`` later, or by :meth:`flush`.
    """

    def __init__(
        self, logger, event: str, level: str = "warning", interval_s: float = 5.0, key: str = "topic", **static
    ):
        self.logger, self.event, self.level, self.interval_s, self.key = logger, event, level, interval_s, key
        self.static = static
        self._lock = threading.Lock()
        self._last = -float("inf")  # monotonic time of the last line
        self._pending = 0
        self._by: Counter = Counter()
        self._fields: dict = {}
        self._timer: threading.Timer | None = None

    def __call__(self, key: str | None = None, n: int = 1, **fields) -> None:
        with self._lock:
            self._pending += n
            if key is not None:
                self._by[key] += n
            self._fields = fields
            wait = self._last + self.interval_s - time.monotonic()
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            line = self._take()
        self._emit(*line)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending:
                return
            line = self._take()
        self._emit(*line)

    def _take(self) -> tuple[int, dict, dict]:
        self._last = time.monotonic()
        line = (self._pending, dict(self._by), self._fields)
        self._pending, self._by = 0, Counter()
        return line

    def _emit(self, count: int, by: dict, fields: dict) -> None:
        extra = {f"by_{self.key}": by} if by else {}
        getattr(self.logger, self.level)(self.event, count=count, **extra, **self.static, **fields)
