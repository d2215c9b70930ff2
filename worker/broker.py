"""An embedded MQTT broker (amqtt, MQTT 3.1.1) for a set-up that has no broker yet."""

from __future__ import annotations

import asyncio
import logging
import threading


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start (for example, the port is taken)."""


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker", daemon=True)
        self._broker = None

    def start(self, timeout: float = 10.0) -> None:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()

        async def start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        try:
            asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout)
        except Exception as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise EmbeddedBrokerError(f"embedded broker could not listen on {self.host}:{self.port}: {exc}") from None

    def stop(self, timeout: float = 5.0) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            except Exception:  # shutting down anyway; nothing left to save
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
