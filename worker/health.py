"""Liveness: the pipeline's heartbeat, the heartbeat file ``emotion-worker health`` reads, systemd's watchdog.

The pipeline's stages beat when they finish work and when they find nothing to do,
so an idle worker stays healthy and only a stage that is stuck with work waiting
lets the heartbeat age. A thread writes the heartbeat to a small file every few
seconds (atomically, so a reader never sees half a file) and, under systemd, pings
the watchdog only while the heartbeat is fresh: a stuck worker is restarted.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from worker import systemd
from worker.log import get_logger

log = get_logger("emotion-worker.health")
HEARTBEAT_NAME = "heartbeat"


class Heartbeat:
    """When each part of the pipeline last made progress or found nothing to do, on the monotonic clock.

    ``age()`` is the time since the part that beat least recently did, so one stuck
    part is enough to make the worker unhealthy. Beating is one assignment: cheap
    enough for every loop turn.
    """

    def __init__(self, parts: tuple[str, ...] = ("prepare", "inference"), clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        now = clock()
        self._last = dict.fromkeys(parts, now)

    def beat(self, part: str) -> None:
        self._last[part] = self._clock()

    def last(self) -> float:
        """The monotonic time (seconds) of the oldest part's last beat."""
        return min(self._last.values())

    def age(self) -> float:
        """Seconds since the least recent part beat."""
        return self._clock() - self.last()

    def stalest(self) -> str:
        """The name of the part that beat least recently."""
        return min(self._last, key=self._last.get)


def heartbeat_path(configured: Path | None) -> Path:
    """Where the heartbeat file is: ``health.heartbeat_file``, else ``$RUNTIME_DIRECTORY/heartbeat``
    (systemd's ``RuntimeDirectory=``), else ``<temp dir>/emotion-worker-<uid>/heartbeat``."""
    if configured is not None:
        return configured
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / HEARTBEAT_NAME
    return Path(tempfile.gettempdir()) / f"emotion-worker-{os.getuid()}" / HEARTBEAT_NAME


def boot_id() -> str | None:
    """This boot's id on Linux: a monotonic time from an earlier boot means nothing now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def write_heartbeat(path: Path, doc: dict) -> None:
    """Replace ``path`` with ``doc`` as JSON in one step (a temporary file, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_dir(path: Path) -> None:
    """Create the heartbeat file's folder (only this user may enter one it creates); ValueError when it cannot."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.parent.stat().st_uid != os.getuid() and not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} belongs to another user")
        write_heartbeat(path, {"starting": True})
    except OSError as exc:
        raise ValueError(f"health.heartbeat_file: cannot write {path}: {exc}") from None


def check(path: Path, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
    """Whether the heartbeat in ``path`` is younger than ``max_age_s`` seconds, and a sentence that says why."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return (
            False,
            f"no heartbeat file at {path}: the worker is not running, or writes it elsewhere (health.heartbeat_file)",
        )
    except (OSError, ValueError) as exc:
        return False, f"cannot read the heartbeat file {path}: {exc}"
    if doc.get("starting"):
        return False, f"the worker (heartbeat file {path}) is still starting"
    try:
        beat = float(doc["beat_monotonic"])
    except (KeyError, TypeError, ValueError):
        return False, f"the heartbeat file {path} holds no heartbeat: {str(doc)[:80]}"
    if doc.get("boot_id") and boot_id() and doc["boot_id"] != boot_id():
        return False, f"the heartbeat in {path} is from before the last boot: the worker is not running"
    age = (time.monotonic() if now is None else now) - beat
    where = f"pid {doc.get('pid')}, {'connected to' if doc.get('connected') else 'not connected to'} the broker"
    if age > max_age_s:
        part = doc.get("stalest", "the pipeline")
        return False, (
            f"unhealthy: no progress for {age:.1f} s (limit {max_age_s:g} s, health.max_age_s): "
            f"the {part} stage is stuck or the worker is gone ({where})"
        )
    return True, f"healthy: heartbeat {age:.1f} s ago (limit {max_age_s:g} s), {where}"


class HealthReporter:
    """A thread that writes the heartbeat file and, under systemd, sends READY, WATCHDOG and STATUS.

    ``ready()`` says when the worker serves (its first connection to the broker),
    ``status()`` gives the one-line status systemd shows. ``settings`` is the
    ``health`` section of the configuration.
    """

    def __init__(
        self,
        settings,
        heartbeat: Heartbeat,
        ready: Callable[[], bool],
        status: Callable[[], str],
        connected: Callable[[], bool] = lambda: False,
    ):
        self.max_age_s = settings.max_age_s
        self.path = heartbeat_path(settings.heartbeat_file)
        self.heartbeat = heartbeat
        self.ready = ready
        self.status = status
        self.connected = connected
        # Often enough that the file lags the heartbeat by a fraction of the limit, rarely enough to cost nothing.
        self.write_every_s = min(5.0, self.max_age_s / 4)
        self.watchdog_every_s = systemd.watchdog_interval()
        self.notify_socket = systemd.notify_socket()
        self.sent_ready = False
        self.stale = False
        self._boot_id = boot_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._last_status = ""
        self._notify_failed = False
        self._stopping = False

    def start(self) -> None:
        prepare_dir(self.path)
        self._thread.start()
        log.info(
            "health reporting",
            heartbeat_file=str(self.path),
            max_age_s=self.max_age_s,
            systemd=self.notify_socket is not None,
            watchdog_every_s=self.watchdog_every_s,
        )

    def stopping(self) -> None:
        """Tell systemd the worker is stopping (before the shutdown's steps, which take a few seconds)."""
        self._stopping = True
        self._notify("STOPPING=1", "STATUS=stopping")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        tick = min(self.write_every_s, self.watchdog_every_s or self.write_every_s, 0.5)
        next_write = next_ping = 0.0
        while True:
            now = time.monotonic()
            fresh = self._check_fresh()
            if now >= next_write:
                self._write(fresh)
                next_write = now + self.write_every_s
            if not self.sent_ready and self.ready():
                self.sent_ready = True
                self._notify("READY=1", f"STATUS={self.status()}")
            if self.watchdog_every_s and now >= next_ping and fresh:
                self._notify("WATCHDOG=1")
                next_ping = now + self.watchdog_every_s
            if self.notify_socket and not self._stopping:
                text = self.status()
                if text != self._last_status:
                    self._notify(f"STATUS={text}")
            if self._stop.wait(tick):
                return

    def _check_fresh(self) -> bool:
        age = self.heartbeat.age()
        fresh = age <= self.max_age_s
        if not fresh and not self.stale:
            log.error(
                "the pipeline is stuck: no progress within health.max_age_s"
                + ("; the systemd watchdog will restart the worker" if self.watchdog_every_s else ""),
                stage=self.heartbeat.stalest(),
                age_s=round(age, 1),
                max_age_s=self.max_age_s,
            )
        elif fresh and self.stale:
            log.info("the pipeline makes progress again", age_s=round(age, 1))
        self.stale = not fresh
        return fresh

    def _write(self, fresh: bool) -> None:
        doc = {
            "pid": os.getpid(),
            "boot_id": self._boot_id,
            "beat_monotonic": self.heartbeat.last(),
            "age_s": round(self.heartbeat.age(), 3),
            "stalest": self.heartbeat.stalest(),
            "fresh": fresh,
            "connected": self.connected(),
            "written_at": time.time(),
        }
        try:
            write_heartbeat(self.path, doc)
        except OSError as exc:  # a full disk must not stop the worker; the health check then says the file is old
            log.warning("cannot write the heartbeat file", path=str(self.path), error=str(exc))

    def _notify(self, *lines: str) -> None:
        for line in lines:
            if line.startswith("STATUS="):
                self._last_status = line[len("STATUS=") :]
        try:
            systemd.notify(*lines)
        except OSError as exc:
            if not self._notify_failed:  # once: the socket does not come back
                self._notify_failed = True
                log.warning("cannot notify systemd", socket=os.environ.get("NOTIFY_SOCKET"), error=str(exc))
