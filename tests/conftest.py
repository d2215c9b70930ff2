"""Shared fixtures: a real Mosquitto per test, small checkpoints, images with faces."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from worker.config import DetectorSettings
from worker.faces import FaceDetector
from worker.model import ModelInfo, ResNet9, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
# A few hundred FER2013 images kept in the repository, so the tests need nothing else.
FER = REPO / "tests" / "data" / "fer2013-mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


class Mosquitto:
    """A Mosquitto broker on a free port, stoppable and restartable on the same port."""

    def __init__(self, workdir: Path, persistence: bool = False, extra: str = ""):
        """With ``persistence``, sessions and their queued messages survive a restart; ``extra``: more config lines."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed; `make test` installs Debian's package")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        keep = f"persistence true\npersistence_location {workdir}/\n" if persistence else "persistence false\n"
        # Started as root, Mosquitto switches to the `mosquitto` user, which cannot write its
        # database into the test's private folder; the sessions would then not survive a restart.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}{keep}{extra}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


class Outage:
    """A TCP relay in front of a broker that can fail like a network: the broker stays up and sees its clients vanish.

    Clients connect to ``port``. ``cut()`` closes every relayed connection and refuses new ones until
    ``restore()``; the broker then publishes the clients' last wills, as it does when Wi-Fi drops.
    """

    def __init__(self, broker_port: int):
        import threading

        self.broker_port = broker_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._flowing = threading.Event()  # cleared by pause(): nothing goes from the clients to the broker
        self._flowing.set()
        self.restore()

    def pause(self) -> None:
        """Stop reading what clients send, so their socket buffers fill up, as on a link that stalls."""
        self._flowing.clear()

    def restore(self) -> None:
        import threading

        self._flowing.set()
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 5
            while True:  # the closed listener lingers while its accept thread finishes a poll
                try:
                    sock.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            sock.listen(16)
            sock.settimeout(0.1)
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
            for src, dst, gate in ((client, upstream, self._flowing), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, gate), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gate) -> None:
        def flowing() -> bool:  # waits while paused; False once the relay is closed or cut
            while gate is not None and not gate.wait(0.1):
                if self._stop.is_set() or src.fileno() < 0:
                    return False
            return True

        try:
            while flowing():
                data = src.recv(65536)
                # Read before a pause, sent after it only once the relay flows again.
                if not data or not flowing():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An initialised (untrained) ResNet9 of width 0.125, saved in the checkpoint format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(ResNet9(width=0.125), ModelInfo(width=0.125, name="tiny-test", version="t1"), path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint as ONNX models: ``fp32`` and ``int8`` (calibrated on 64 faces of the test images).

    Both sit in one folder with a copy of the checkpoint, named as ``emotion-train
    export --onnx`` names them (``tiny.onnx``, ``tiny.int8.onnx`` beside ``tiny.safetensors``).
    """
    from training.data import load_split
    from training.export import quantize_onnx, set_onnx_metadata, standard_elu, write_onnx
    from worker.model import load_checkpoint, onnx_beside

    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = folder / tiny_checkpoint.name
    shutil.copy(tiny_checkpoint, checkpoint)
    model, info = load_checkpoint(checkpoint)
    fp32, int8 = onnx_beside(checkpoint, "fp32"), onnx_beside(checkpoint, "int8")
    write_onnx(standard_elu(model).float(), info, fp32)
    set_onnx_metadata(fp32, {**info.to_metadata(), "onnx_precision": "fp32"})
    faces = load_split(FER, "train").images[::5][:64].unsqueeze(1).float().div(255)
    quantize_onnx(fp32, int8, ((faces - info.mean) / info.std).numpy())
    set_onnx_metadata(int8, {**info.to_metadata(), "onnx_precision": "int8"})
    return {"checkpoint": checkpoint, "fp32": fp32, "int8": int8}


@pytest.fixture(scope="session")
def face_frames() -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """640x480 BGR frames, each a FER2013 val face enlarged to 160 px and pasted at a known place.

    Only faces the Haar cascade finds are kept; returns (frame, (x, y, w, h) of the paste).
    """
    detector = FaceDetector(DetectorSettings())
    frames = []
    for path in sorted((FER / "val" / "happy").glob("*.jpg")):
        face = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (160, 160), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((480, 640), 90, np.uint8)
        x, y = 240, 120
        canvas[y : y + 160, x : x + 160] = face
        frame = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
        if detector.detect(frame):
            frames.append((frame, (x, y, 160, 160)))
        if len(frames) == 4:
            break
    assert frames, f"no FER2013 face in {FER} was detected"
    return frames


@pytest.fixture
def worker_env(mosquitto, tiny_checkpoint) -> dict[str, str]:
    """Environment for a worker subprocess talking to the test broker with the tiny model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
    env.update(
        EMOTION_MQTT__PORT=str(mosquitto.port),
        EMOTION_MQTT__RECONNECT_MIN_S="0.2",
        EMOTION_MQTT__RECONNECT_MAX_S="1",
        EMOTION_MODEL__WEIGHTS=str(tiny_checkpoint),
        EMOTION_MODEL__THREADS="1",
        EMOTION_LOG__FORMAT="json",
        EMOTION_LOG__LEVEL="debug",
        EMOTION_PIPELINE__STATS_INTERVAL_S="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen:
    """``emotion-worker run`` as a subprocess, its log in ``log_path``."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", *args],
        env=env,
        cwd=REPO,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def worker(worker_env, tmp_path):
    """``worker(extra_env, *args)`` starts a worker with the tiny model; returns (process, log path).

    Every worker still running is killed at the end of the test.
    """
    procs = []

    def run(extra_env=None, *args):
        env = {**worker_env, **(extra_env or {})}
        log = tmp_path / f"worker-{len(procs)}.log"
        procs.append(start_worker(env, log, *args))
        return procs[-1], log

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


class Listener:
    """A paho client that records every message on the topics it subscribes to.

    A ``persistent`` one keeps its session, so the broker holds its QoS 1 messages while it is away.
    """

    def __init__(self, port: int, topics: list[str], persistent: bool = False):
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list = []
        self._cond = threading.Condition()
        self.subscribed = threading.Event()  # set once the broker acknowledged the subscriptions
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-listener-{time.time_ns()}", clean_session=not persistent
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "a message"):
        """The first recorded message for which ``predicate(msg)`` is true, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages]
                    raise AssertionError(f"no {what} within {timeout} s; saw {seen}")
                self._cond.wait(left)

    def on(self, topic: str) -> list:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def listen(mosquitto):
    """``listen(topics)`` gives a Listener on the test broker; closed after the test."""
    made = []

    def make(topics: list[str]) -> Listener:
        made.append(Listener(mosquitto.port, topics))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def publisher(port: int):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-camera-{time.time_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="reads thread signal masks from Linux /proc"
)


def signals_blocked_by_other_threads(pid: int) -> dict[str, set[int]]:
    """The signals each thread of a Linux process but its main thread blocks, by thread name and id."""
    out = {}
    for task in (Path("/proc") / str(pid) / "task").iterdir():
        if task.name == str(pid):
            continue
        try:
            text = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended after the listing
            continue
        status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        mask = int(status["SigBlk"], 16)
        out[f"{status['Name'].strip()}-{task.name}"] = {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return out


@pytest.fixture
def json_log():
    """The worker's JSON logging into a buffer at info level; the process's logging is restored afterwards."""
    import io
    import logging

    import structlog

    from worker.log import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    setup_logging("info", "json", stream=buf)
    yield buf
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)  # setup_logging routes warnings into the log
