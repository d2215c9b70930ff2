"""The Prometheus endpoint: the worker's :class:`~worker.stats.Stats` read at each scrape.

A custom collector reads the counters the worker keeps anyway, so nothing is
counted twice and the log line, the stats topic and the metrics cannot disagree.
Off unless ``metrics.port`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

import worker
from worker.log import get_logger
from worker.stats import Stats

log = get_logger("emotion-worker.metrics")

# Frame outcomes: each frame received ends as exactly one of these (or is still in flight).
OUTCOMES = ("processed", "dropped", "stale", "rejected")
HISTOGRAM_HELP = {
    "latency_seconds": "Time from a frame's capture (or arrival) to its event's publication, in seconds.",
    "inference_seconds": "Time the network took for one batch of faces, in seconds.",
    "batch_faces": "Faces classified together in one batch.",
}


@dataclass
class Sources:
    """What the collector reads: the stats, and callables for what lives elsewhere."""

    stats: Stats
    model: dict[str, str]  # name, version, device, precision, tta
    queues: dict[str, Callable[[], int]] = field(default_factory=dict)
    connected: Callable[[], bool] = lambda: False
    heartbeat_age: Callable[[], float] | None = None
    cuda_device: object | None = None  # a torch.device when the model runs on CUDA


class StatsCollector:
    """A Prometheus collector over :class:`Sources`; every metric is named ``emotion_*``."""

    def __init__(self, sources: Sources):
        self.s = sources

    def collect(self):
        counts, rejected, publishes_dropped = self.s.stats.counters()
        frames = CounterMetricFamily("emotion_frames", "Frames by outcome.", labels=["outcome"])
        for outcome in OUTCOMES:
            frames.add_metric([outcome], counts.get(outcome, 0))
        yield frames
        yield CounterMetricFamily("emotion_frames_received", "Frames received.", value=counts.get("received", 0))
        by_reason = CounterMetricFamily("emotion_frames_rejected", "Rejected frames by reason.", labels=["reason"])
        for reason, n in sorted(rejected.items()):
            by_reason.add_metric([reason], n)
        yield by_reason
        yield CounterMetricFamily(
            "emotion_frames_without_face", "Frames in which no face was found.", value=counts.get("no_face", 0)
        )
        yield CounterMetricFamily("emotion_events", "Events published.", value=counts.get("events", 0))
        yield CounterMetricFamily("emotion_faces", "Faces classified.", value=counts.get("faces", 0))
        dropped = CounterMetricFamily(
            "emotion_publishes_dropped", "Messages that never reached the broker, by topic.", labels=["topic"]
        )
        for topic, n in sorted(publishes_dropped.items()):
            dropped.add_metric([topic], n)
        yield dropped
        actions = CounterMetricFamily("emotion_rule_actions", "Actions the rules took, by rule.", labels=["rule"])
        errors = CounterMetricFamily(
            "emotion_rule_errors", "Rule actions that failed (a template error), by rule.", labels=["rule"]
        )
        for rule, n in self.s.stats.rule_counts().items():
            actions.add_metric([rule], n["actions"])
            errors.add_metric([rule], n["errors"])
        yield actions
        yield errors
        for name, text in HISTOGRAM_HELP.items():
            buckets, total = self.s.stats.histogram(name)
            yield HistogramMetricFamily(
                f"emotion_{name}",
                text,
                buckets=[(_le(bound), n) for bound, n in buckets],
                sum_value=total,
            )
        depth = GaugeMetricFamily("emotion_queue_depth", "Frames waiting in each queue.", labels=["queue"])
        for queue, length in self.s.queues.items():
            depth.add_metric([queue], length())
        yield depth
        yield GaugeMetricFamily(
            "emotion_mqtt_connected", "1 while connected to the broker.", value=1 if self.s.connected() else 0
        )
        if self.s.heartbeat_age is not None:
            yield GaugeMetricFamily(
                "emotion_heartbeat_age_seconds",
                "Seconds since the least recent pipeline stage made progress or found nothing to do.",
                value=self.s.heartbeat_age(),
            )
        yield InfoMetricFamily("emotion_model", "The emotion model being served.", value=self.s.model)
        yield InfoMetricFamily("emotion_worker", "The worker.", value={"version": worker.__version__})
        if self.s.cuda_device is not None:
            yield from _gpu_memory(self.s.cuda_device)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _gpu_memory(device):
    import torch

    memory = GaugeMetricFamily(
        "emotion_gpu_memory_bytes", "GPU memory held by PyTorch on the model's device.", labels=["device", "kind"]
    )
    name = str(device)
    memory.add_metric([name, "allocated"], torch.cuda.memory_allocated(device))
    memory.add_metric([name, "reserved"], torch.cuda.memory_reserved(device))
    yield memory


class MetricsServer:
    """``/metrics`` over HTTP on ``settings.host``:``settings.port`` (the ``metrics`` section)."""

    def __init__(self, settings, sources: Sources):
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(sources))
        self._server = None
        self._thread = None

    def start(self) -> None:
        """Listen; a port that cannot be had is a ValueError naming ``metrics.port``."""
        s = self.settings
        try:
            self._server, self._thread = start_http_server(s.port, addr=s.host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"metrics.port: cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from None
        log.info("metrics endpoint listening", url=f"http://{s.host}:{s.port}/metrics")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
