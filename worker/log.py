"""structlog set-up: readable lines on a terminal, JSON lines otherwise.

Libraries that log through the standard library (paho-mqtt, amqtt) go through the
same renderer, so a JSON log stays one JSON object per line.
"""

from __future__ import annotations

import logging
import sys

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


def get_logger(name: str = "emotion-worker"):
    return structlog.get_logger(name)
