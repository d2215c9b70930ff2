"""The worker's counters and recent latencies: what the stats log line and topic report."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, defaultdict, deque

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
