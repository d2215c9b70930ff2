"""The worker's counters and recent latencies: what the stats log line and topic report."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import Counter, defaultdict, deque
from collections.abc import Callable

from worker.log import get_logger

log = get_logger("emotion-worker.stats")

# Upper bounds of the histograms' buckets, as Prometheus exports them (seconds, faces).
HISTOGRAMS = {
    "latency_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    "inference_seconds": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    "batch_faces": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
}


class Histogram:
    """Counts of observations at or below each bound, their sum and number: a Prometheus histogram."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or below it) for each bound, then (inf, all observations)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self._counts):
            total += n
            out.append((bound, total))
        return out


class Stats:
    """Counters and recent latencies, safe to update from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.latencies: deque = deque(maxlen=2000)  # ms
        self.histograms = {name: Histogram(bounds) for name, bounds in HISTOGRAMS.items()}
        self.publishes_dropped: Counter = Counter()  # by topic
        self.publishes_dropped_by: defaultdict[str, Counter] = defaultdict(Counter)  # reason -> topic -> messages
        self.rules: defaultdict[str, Counter] = defaultdict(Counter)  # rule name -> actions, errors

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def reject(self, reason: str) -> None:
        with self._lock:
            self.counts["rejected"] += 1
            self.rejected[reason] += 1

    def latency(self, ms: float) -> None:
        with self._lock:
            self.latencies.append(ms)
            self.histograms["latency_seconds"].observe(ms / 1000)

    def observe(self, name: str, value: float) -> None:
        """Add ``value`` to the histogram ``name`` (one of :data:`HISTOGRAMS`)."""
        with self._lock:
            self.histograms[name].observe(value)

    def publish_dropped(self, topic: str, n: int = 1, reason: str = "publish_error") -> None:
        """Count ``n`` messages to ``topic`` that never reached the broker, and why.

        Reasons: ``queue_full`` (the outage queue was full), ``refused`` (the broker answered with an
        error, e.g. not authorized), ``publish_error`` (the client could not send it), ``connection_lost``
        (QoS 0, in the client's buffer when the connection dropped), ``shutdown`` (still waiting at stop).
        """
        with self._lock:
            self.counts["publishes_dropped"] += n
            self.publishes_dropped[topic] += n
            self.publishes_dropped_by[reason][topic] += n

    def rule(self, name: str, what: str) -> None:
        """Count one action (``what="actions"``) or failed action (``"errors"``) of the rule ``name``, and the
        total (``actions``, ``action_errors``)."""
        with self._lock:
            self.counts["actions" if what == "actions" else "action_errors"] += 1
            self.rules[name][what] += 1

    def rule_counts(self) -> dict[str, dict[str, int]]:
        """Actions and errors by rule name, e.g. ``{"kitchen-led": {"actions": 3, "errors": 0}}``."""
        with self._lock:
            return {name: {"actions": c["actions"], "errors": c["errors"]} for name, c in sorted(self.rules.items())}

    def histogram(self, name: str) -> tuple[list[tuple[float, int]], float]:
        """The histogram ``name``: its cumulative buckets (see :meth:`Histogram.cumulative`) and sum."""
        with self._lock:
            h = self.histograms[name]
            return h.cumulative(), h.sum

    def counters(self) -> tuple[dict, dict, dict]:
        """Copies of the counters, the rejections by reason and the dropped publishes by topic, taken together."""
        with self._lock:
            return dict(self.counts), dict(self.rejected), dict(self.publishes_dropped)

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            out = dict(self.counts)
            out["rejected_by_reason"] = dict(self.rejected)
            out["publishes_dropped_by_reason"] = {r: dict(topics) for r, topics in self.publishes_dropped_by.items()}
        if lat:
            out["latency_ms_p50"] = round(lat[len(lat) // 2], 1)
            out["latency_ms_p95"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 1)
        return out


# -- the periodic statistics document (the retained stats topic and the stats log line) ------------------------
FRAME_COUNTS = ("received", "processed", "dropped", "stale", "no_face", "rejected")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``sorted_values`` by the nearest-rank method, or None when empty."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class IntervalStats:
    """What a stats interval needs beyond :class:`Stats`' totals: the latencies and batch sizes since the
    last report. Safe to update from any thread."""

    def __init__(self, max_samples: int = 100_000):
        self._lock = threading.Lock()
        self._latencies: deque = deque(maxlen=max_samples)  # ms
        self._batches = 0
        self._batched = 0

    def latency(self, ms: float) -> None:
        with self._lock:
            self._latencies.append(ms)

    def batch(self, faces: int) -> None:
        with self._lock:
            self._batches += 1
            self._batched += faces

    def take(self) -> tuple[list[float], int, int]:
        """The latencies (ms, sorted), batch count and faces in batches since the last call; starts anew."""
        with self._lock:
            lat, self._latencies = sorted(self._latencies), deque(maxlen=self._latencies.maxlen)
            batches, batched, self._batches, self._batched = self._batches, self._batched, 0, 0
        return lat, batches, batched


class StatsReporter:
    """Every ``interval_s``: one stats document, logged and handed to ``publish``.

    ``context()`` gives what the counters do not hold: ``queue_depth``, ``device``, ``precision``,
    ``model`` ({"name", "version"}) and ``detector``. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        stats: Stats,
        interval: IntervalStats,
        interval_s: float,
        context: Callable[[], dict],
        publish: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stats = stats
        self.interval = interval
        self.interval_s = interval_s
        self.context = context
        self.publish = publish
        self.clock = clock
        self.started = clock()
        self._last_at = self.started
        self._last_processed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="stats", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report()
            except Exception:  # the next interval tries again
                log.exception("stats report failed")

    def document(self) -> dict:
        """The stats since start (counters) and over the last interval (rates, latencies, batch size)."""
        now = self.clock()
        snap, rejected_by_reason, _ = self.stats.counters()
        dropped_by_reason = self.stats.snapshot().get("publishes_dropped_by_reason", {})
        lat, batches, batched = self.interval.take()
        frames = {k: snap.pop(k, 0) for k in FRAME_COUNTS}
        frames["rejected_by_reason"] = rejected_by_reason
        elapsed = max(1e-9, now - self._last_at)
        fps = (frames["processed"] - self._last_processed) / elapsed
        self._last_at, self._last_processed = now, frames["processed"]
        ctx = self.context()
        return {
            "uptime_s": round(now - self.started, 1),
            "interval_s": round(elapsed, 1),
            "frames": frames,
            "events": snap.pop("events", 0),
            "faces": snap.pop("faces", 0),
            "frames_per_s": round(fps, 2),
            "latency_ms": {f"p{q}": _round(percentile(lat, q / 100)) for q in (50, 95, 99)},
            "queue_depth": ctx.get("queue_depth"),
            "batch_mean": round(batched / batches, 2) if batches else None,
            "device": ctx.get("device"),
            "precision": ctx.get("precision"),
            "model": ctx.get("model"),
            "detector": ctx.get("detector"),
            "counts": snap,  # every other counter (state changes, publishes dropped, ...)
            "publishes_dropped_by_reason": dropped_by_reason,  # reason -> topic -> messages
            "rules": self.stats.rule_counts(),  # rule name -> actions, errors
        }

    def report(self) -> dict:
        doc = self.document()
        log.info("stats", **doc)
        if self.publish is not None:
            try:
                self.publish(doc)
            except Exception:
                self.stats.add("stats_publish_errors")
                log.exception("could not publish the stats")
        return doc


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
