"""The Prometheus collector over Stats, and its HTTP endpoint (a running worker's: tests/worker/test_running.py)."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from worker.config import MetricsSettings
from worker.metrics import MetricsServer, Sources, StatsCollector
from worker.stats import Stats

MODEL = {"name": "m", "version": "v", "device": "cpu", "precision": "fp32", "tta": "none"}


def scrape(sources: Sources) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(sources))
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histograms_count_observations_at_or_below_each_bound():
    stats = Stats()
    for ms in (4, 10, 30, 30, 20_000):  # 20 s: above every bound
        stats.latency(ms)
    samples = scrape(Sources(stats=stats, model=MODEL))
    bucket = lambda le: samples[("emotion_latency_seconds_bucket", (("le", le),))]
    assert bucket("0.01") == 2  # 4 ms and exactly 10 ms
    assert bucket("0.025") == 2
    assert bucket("0.05") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert samples[("emotion_latency_seconds_count", ())] == 5
    assert samples[("emotion_latency_seconds_sum", ())] == pytest.approx(20.074)


def test_outcomes_reasons_dropped_publishes_and_queues():
    stats = Stats()
    stats.add("received", 9)
    stats.add("processed", 4)
    stats.add("dropped", 2)
    stats.add("stale", 1)
    stats.reject("bad_json")
    stats.reject("bad_json")
    stats.publish_dropped("emotion/events", 3)
    stats.publish_dropped("emotion/errors")
    stats.observe("batch_faces", 3)
    samples = scrape(Sources(stats=stats, model=MODEL, queues={"inbox": lambda: 5}, connected=lambda: False))
    assert samples[("emotion_frames_received_total", ())] == 9
    assert samples[("emotion_frames_total", (("outcome", "processed"),))] == 4
    assert samples[("emotion_frames_total", (("outcome", "dropped"),))] == 2
    assert samples[("emotion_frames_total", (("outcome", "stale"),))] == 1
    assert samples[("emotion_frames_total", (("outcome", "rejected"),))] == 2
    assert samples[("emotion_frames_rejected_total", (("reason", "bad_json"),))] == 2
    assert samples[("emotion_publishes_dropped_total", (("topic", "emotion/events"),))] == 3
    assert samples[("emotion_publishes_dropped_total", (("topic", "emotion/errors"),))] == 1
    assert samples[("emotion_batch_faces_bucket", (("le", "2.0"),))] == 0
    assert samples[("emotion_batch_faces_bucket", (("le", "4.0"),))] == 1
    assert samples[("emotion_queue_depth", (("queue", "inbox"),))] == 5
    assert samples[("emotion_mqtt_connected", ())] == 0
    assert samples[("emotion_model_info", tuple(sorted(MODEL.items())))] == 1


def test_gpu_memory_is_exported_when_the_model_runs_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 123_000_000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 256_000_000)
    samples = scrape(Sources(stats=Stats(), model=MODEL, cuda_device=torch.device("cuda:0")))
    assert samples[("emotion_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "allocated")))] == 123_000_000
    assert samples[("emotion_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "reserved")))] == 256_000_000
    assert not any(name.startswith("emotion_gpu") for name, _ in scrape(Sources(stats=Stats(), model=MODEL)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the test above covers the CPU path")
def test_gpu_memory_on_a_real_device():
    device = torch.device("cuda:0")
    held = torch.zeros(1024, 1024, device=device)  # 4 MiB
    samples = scrape(Sources(stats=Stats(), model=MODEL, cuda_device=device))
    assert samples[("emotion_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "allocated")))] >= held.numel() * 4


def test_endpoint_serves_over_http_and_a_taken_port_names_the_key():
    server = MetricsServer(MetricsSettings(port=free_port(), host="127.0.0.1"), Sources(stats=Stats(), model=MODEL))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.settings.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "emotion_frames_total" in text
        clash = MetricsServer(MetricsSettings(port=server.settings.port, host="127.0.0.1"), server_sources())
        with pytest.raises(ValueError, match=rf"metrics\.port: cannot listen on 127\.0\.0\.1:{server.settings.port}"):
            clash.start()
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.settings.port), timeout=1).close()


def server_sources() -> Sources:
    return Sources(stats=Stats(), model=MODEL)


def test_rule_actions_and_errors_by_rule():
    stats = Stats()
    stats.rule("kitchen-led", "actions")
    stats.rule("kitchen-led", "actions")
    stats.rule("phone-alert", "errors")
    samples = scrape(Sources(stats=stats, model=MODEL))
    assert samples[("emotion_rule_actions_total", (("rule", "kitchen-led"),))] == 2
    assert samples[("emotion_rule_actions_total", (("rule", "phone-alert"),))] == 0
    assert samples[("emotion_rule_errors_total", (("rule", "phone-alert"),))] == 1
