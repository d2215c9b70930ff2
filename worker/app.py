"""The worker's start and stop, as a straight list of steps."""

from __future__ import annotations

import threading

from worker.broker import RunningBroker, start_broker
from worker.classify import Classifier, val_acc_key
from worker.config import Settings
from worker.discovery import Discovery
from worker.events import SKIPPED
from worker.faces import FaceDetector, share_cores
from worker.health import HealthReporter
from worker.log import get_logger
from worker.metrics import MetricsServer, Sources
from worker.mqtt import MqttLink
from worker.pipeline import Pipeline
from worker.rules import RulesEngine, RuleSet, load_rules, local_zone, model_classes
from worker.signals import RELOAD_SIGNALS, wait_for_signal
from worker.state import StateTracker
from worker.stats import StatsReporter
from worker.topics import device_topic, worker_stats

log = get_logger("emotion-worker")


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.broker: RunningBroker | None = None
        self.link: MqttLink | None = None
        self.pipeline: Pipeline | None = None
        self.tracker: StateTracker | None = None
        self.discovery: Discovery | None = None
        self.reporter: StatsReporter | None = None
        self.metrics: MetricsServer | None = None
        self.health: HealthReporter | None = None
        self.rules: RulesEngine | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        s = self.settings
        # 0. The rules, checked before anything slow starts: a bad rule stops the start like a bad setting.
        rules_file = s.rules.path()
        classes = model_classes(s)
        if rules_file.is_file() or s.rules.file is not None:
            ruleset = load_rules(rules_file, classes, s.topics.frames)
            log.info("rules loaded", file=str(rules_file), rules=ruleset.names)
        else:
            ruleset = RuleSet(source=str(rules_file))
            log.info("no rules", file=str(rules_file), note="rules are read from this file once it exists")
        # 1. The model, warmed up, so the first frame is not slow and a bad checkpoint fails now.
        classifier = Classifier(s.model, reserve_cores=s.pipeline.threads)
        info = classifier.info
        log.info(
            "model loaded",
            path=str(classifier.path),
            name=info.name,
            version=info.version,
            size=info.shape,  # "width 1" or "stages 16,64,192"
            channels=list(info.channels),
            device=str(classifier.device),
            backend=classifier.backend,
            precision=classifier.precision,
            tta=classifier.tta,
            threads=classifier.threads,
            why=list(classifier.plan.why),  # what model.* = "auto" picked on this machine, and why
            # Accuracy on FER2013 val/ as recorded at export, with the TTA this worker uses.
            val_acc=info.extra.get(val_acc_key(classifier.tta)),
        )
        # 2. The face detector.
        detector = FaceDetector(s.detector)
        opencv_threads = share_cores(s.pipeline.threads)
        log.info(
            "face detector ready",
            kind=s.detector.kind,
            detect_width=s.detector.detect_width,
            threads=s.pipeline.threads,
            opencv_threads=opencv_threads,
        )
        # 3. The embedded broker, when asked for: the one already on the port, else Mosquitto, else amqtt.
        if s.broker.embedded:
            self.broker = start_broker(s.broker.kind, s.broker.host, s.broker.port)
            b = self.broker.info
            s.mqtt = s.mqtt.model_copy(update={"host": b.host, "port": b.port, "protocol": b.protocol})
            log.info(
                "using the broker already running" if b.kind == "existing" else "embedded broker started",
                broker=b.describe(),
                **(
                    {"note": "MQTT 3.1.1 only, no shared subscriptions; install Mosquitto for MQTT 5"}
                    if b.kind == "amqtt"
                    else {}
                ),
            )
        # 4. The pipeline, and the steady emotion per camera that its frames feed (retained state, changes).
        self.pipeline = Pipeline(
            s,
            classifier,
            detector,
            publish_event=lambda e: self.link.publish_json(s.topics.events, e, qos=1),
            publish_error=lambda e: self.link.publish_json(s.topics.errors, e, qos=0),
            report=self._report,
            observe=lambda frame, faces: self.tracker.observe(frame.device_id, faces),
        )
        model = {"name": info.name, "version": info.version}
        self.tracker = StateTracker(
            s.state,
            info.classes,
            model,
            publish_state=lambda device, doc: self.link.publish_json(
                device_topic(s.topics.state, device), doc, qos=1, retain=True
            ),
            publish_change=lambda record: self.link.publish_json(s.topics.changes, record, qos=1),
            stats=self.pipeline.stats,
        )
        # 5. The pipeline threads, then the MQTT connection that feeds them. Discovery subscribes before the
        #    connection, so that the first one reads back what was announced before.
        self.pipeline.start()
        self.link = MqttLink(s, self.pipeline.submit, stats=self.pipeline.stats)
        if s.homeassistant.discovery:
            self.discovery = Discovery(
                s,
                self.link.client_id,
                self.link.status_topic,
                model,
                info.classes,
                self.tracker,
                publish=lambda topic, payload, retain: self.link.publish(topic, payload, qos=1, retain=retain),
                is_connected=self.link.connected.is_set,
            )
            self.discovery.subscribe(self.link)
            self.tracker.add_listener(self.discovery.on_state)
            self.discovery.start()
        # The rules act on every evaluation of a camera's state, through the same connection.
        self.rules = RulesEngine(
            ruleset,
            publish=lambda topic, payload, qos, retain: self.link.publish(topic, payload, qos=qos, retain=retain),
            publish_json=lambda topic, doc, qos: self.link.publish_json(topic, doc, qos=qos),
            actions_topic=s.topics.actions,
            errors_topic=s.topics.errors,
            path=rules_file,
            classes=classes,
            frames=s.topics.frames,
            zone=local_zone(s.rules.timezone),
            stats=self.pipeline.stats,
            watch_s=s.rules.watch_s,
        )
        self.tracker.add_listener(self.rules.on_state)
        self.link.start()
        # 6. The ticks that turn cameras without frames to 'none' (and let rules act on time held), and the
        #    checks of the rules file for changes.
        self.tracker.start()
        self.rules.start()
        # 7. Statistics: logged and retained on <stats>/<client id> every stats_interval_s.
        self.reporter = StatsReporter(
            self.pipeline.stats,
            self.pipeline.interval,
            s.pipeline.stats_interval_s,
            context=lambda: {
                "queue_depth": len(self.pipeline.inbox) + len(self.pipeline.ready),
                "device": str(classifier.device),
                "precision": classifier.precision,
                "model": model,
                "detector": s.detector.kind,
            },
            publish=lambda doc: self.link.publish_json(
                worker_stats(s.topics.stats, self.link.client_id), doc, qos=1, retain=True
            ),
        )
        self.reporter.start()
        # 8. The Prometheus endpoint, when asked for.
        if s.metrics.port:
            self.metrics = MetricsServer(
                s.metrics,
                Sources(
                    stats=self.pipeline.stats,
                    model={
                        "name": info.name,
                        "version": info.version,
                        "device": str(classifier.device),
                        "precision": classifier.precision,
                        "tta": classifier.tta,
                    },
                    queues={"inbox": lambda: len(self.pipeline.inbox), "ready": lambda: len(self.pipeline.ready)},
                    connected=self.link.connected.is_set,
                    heartbeat_age=self.pipeline.heartbeat.age,
                    cuda_device=classifier.device if classifier.device.type == "cuda" else None,
                ),
            )
            self.metrics.start()
        # 9. Liveness: the heartbeat file `emotion-worker health` reads; under systemd READY=1 once
        #    connected, and the watchdog while the pipeline makes progress.
        self.health = HealthReporter(
            s.health,
            self.pipeline.heartbeat,
            ready=lambda: self.link.connections > 0,
            status=self._status,
            connected=self.link.connected.is_set,
        )
        self.health.start()

    def _status(self) -> str:
        """One line for `systemctl status`."""
        if not self.link.connected.is_set():
            why = f": {self.link.last_error}" if self.link.last_error else ""
            return f"waiting for the broker at {self.link.where}{why}"
        counts = self.pipeline.stats.counts
        return (
            f"serving {self.link.where}: {counts['events']} events, {counts['dropped']} frames dropped, "
            f"{counts['rejected']} rejected"
        )

    def _report(self, outcome: dict, reply) -> None:
        """A frame's outcome: on its reply topic when it asked, on the skipped topic when it gave no record."""
        if outcome["outcome"] in SKIPPED:
            self.link.publish_json(self.settings.topics.skipped, outcome, qos=0)
        if reply is not None:
            self.link.publish_reply(reply, outcome)

    def serve_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT (held since start-up, see :mod:`worker.signals`), then stop.

        SIGHUP reloads the rules, and serving goes on.
        """
        while True:
            sig = wait_for_signal()
            log.info("signal received", signal=sig.name)
            if sig not in RELOAD_SIGNALS:
                break
            self.reload()
        self.stop()

    def reload(self) -> bool:
        """Read the rules file again; a bad file leaves the rules in force (and says why in the log)."""
        return self.rules.reload("SIGHUP") if self.rules else False

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop consuming, finish in-flight frames, publish offline, disconnect, stop threads."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        log.info("stopping")
        if self.health:
            self.health.stopping()
        if self.link:
            self.link.stop_consuming()
        if self.pipeline and not self.pipeline.drain(drain_timeout):
            log.warning("frames still in flight at shutdown were abandoned", timeout_s=drain_timeout)
        if self.reporter:
            self.reporter.stop()
        if self.discovery:
            self.discovery.stop()
        if self.tracker:
            self.tracker.stop()
        if self.rules:
            self.rules.stop()
        if self.link:
            self.link.close()
        if self.pipeline:
            self.pipeline.stop()
            log.info("stopped", **self.pipeline.stats.snapshot())
        if self.health:
            self.health.stop()
        if self.metrics:
            self.metrics.stop()
        if self.broker:
            self.broker.stop()
