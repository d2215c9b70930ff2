"""The worker's counters and recent latencies: what the stats log line and topic report."""

from __future__ import annotations

import threading
from collections import Counter, deque


class Stats:
    """Counters and recent latencies, safe to update from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.latencies: deque = deque(maxlen=2000)  # ms

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

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            out = dict(self.counts)
            out["rejected_by_reason"] = dict(self.rejected)
        if lat:
            out["latency_ms_p50"] = round(lat[len(lat) // 2], 1)
            out["latency_ms_p95"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 1)
        return out
