"""A stock amqtt broker on its own event-loop thread, stoppable and restartable on one port,
for testing the device SDK against a broker that is not ours."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from blendsm.device_sdk import Envelope, MessageDomain, decode_envelope, verify_envelope

STOCK_OPERATORS = ("0x" + "a1" * 20, "0x" + "b2" * 20)
"""Made-up operator addresses for SDK tests against stock brokers (one per broker)."""


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StoppableStockBroker(Broker):
    """Stock amqtt with one repair: on Python 3.11 ``asyncio.wait_for`` swallows the cancel of
    a connection's reader when a packet (a PUBACK of an in-flight delivery) arrives with it,
    and amqtt's shutdown then waits for that reader forever (20-40 % of stops mid-stream).
    BlendBroker's own handler cancels until the reader is gone
    (tests/integration/test_shutdown.py); the SDK is tested against a stock broker, so this
    one does the same."""

    async def _stop_handler(self, handler: Any) -> None:
        task = handler._reader_task
        for _ in range(100):  # 5 s at most
            if task is None or task.done() or task is asyncio.current_task():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        await super()._stop_handler(handler)


ANONYMOUS: dict[str, Any] = {
    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
}
"""The plugins of a broker that lets every client in."""


class StockBroker:
    """A stock amqtt broker on its own event loop thread; can stop and start on one port.
    ``plugins`` is amqtt's plugin section (default: everyone allowed in)."""

    def __init__(self, port: int, plugins: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.broker: Any = None
        self.hung: Any = None  # a broker whose shutdown never finished
        self.port = port
        self.plugins = ANONYMOUS if plugins is None else plugins

    def start(self) -> StockBroker:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": self.plugins,
        }

        async def start() -> Any:
            broker = StoppableStockBroker(config)
            await broker.start()
            return broker

        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop)
            broker, self.broker = self.broker, None
            try:
                fut.result(timeout)
            except TimeoutError:
                self.hung = broker
                raise

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class EnvelopeReader:
    """A raw paho subscriber on ``data/#`` (QoS 1) that resubscribes on every connect and
    decodes each envelope, checking it was signed by ``device`` in ``domain``; ``got`` holds
    (topic, envelope) pairs."""

    def __init__(self, port: int, domain: MessageDomain, device: str) -> None:
        self.domain, self.device = domain, device
        self.got: queue.Queue[tuple[str, Envelope]] = queue.Queue()
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-reader-{port}")
        c.on_connect = lambda cl, *_a: cl.subscribe("data/#", 1)
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 1)
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        assert self.subscribed.wait(5)
        self.mqtt = c

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        envelope = decode_envelope(m.payload)
        assert verify_envelope(self.domain, m.topic, envelope) == self.device
        self.got.put((m.topic, envelope))

    def take(self, n: int, timeout: float = 5.0) -> list[tuple[str, Envelope]]:
        return [self.got.get(timeout=timeout) for _ in range(n)]

    def quiet(self, within: float = 0.3) -> bool:
        try:
            self.got.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
