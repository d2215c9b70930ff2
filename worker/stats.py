"""The worker's counters and recent latencies: what the stats log line and topic report."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque


class Stats:
    """Counters and recent latencies, safe to update from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.latencies: deque = deque(maxlen=2000)  # ms
        self.publish_lost_by: defaultdict[str, Counter] = defaultdict(Counter)  # reason -> topic -> messages

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def reject(self, reason: str) -> None:
        with self._lock:
            self.counts["rejected"] += 1
            self.rejected[reason] += 1

    def publish_lost(self, reason: str, topic: str, n: int = 1) -> None:
        """Count ``n`` messages for ``topic`` that did not reach the broker, for ``reason``.

        Reasons: ``queue_full`` (the outage queue was full), ``refused`` (the broker answered with an
        error, e.g. not authorized), ``publish_error`` (the client could not send it), ``connection_lost``
        (QoS 0, in the client's buffer when the connection dropped), ``shutdown`` (still waiting at stop).
        """
        with self._lock:
            self.counts["publish_lost"] += n
            self.publish_lost_by[reason][topic] += n

    def latency(self, ms: float) -> None:
        with self._lock:
            self.latencies.append(ms)

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            out = dict(self.counts)
            out["rejected_by_reason"] = dict(self.rejected)
            out["publish_lost_by_reason"] = {reason: dict(topics) for reason, topics in self.publish_lost_by.items()}
        if lat:
            out["latency_ms_p50"] = round(lat[len(lat) // 2], 1)
            out["latency_ms_p95"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 1)
        return out
