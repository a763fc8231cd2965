"""The stock amqtt broker the SDK tests run against stops, even mid-stream.

Stock amqtt 0.12.1 on Python 3.11 sometimes waits forever in ``shutdown()`` when a PUBACK
arrives with the cancel of a connection's reader; a stop that hangs fails an SDK test that
has nothing wrong with it (CI, 2026-12-04). Every SDK test module uses
``support.stock_amqtt.StockBroker``, whose shutdown cancels until the reader is gone.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from support.stock_amqtt import StockBroker, free_port

ROUNDS = 6


def _client(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c


def test_the_stock_broker_stops_within_seconds_while_qos1_flows_both_ways() -> None:
    """Each round a publisher and a subscriber exchange QoS 1 messages (PUBACKs in flight in
    both directions) and the broker is stopped in the middle; every stop must end in 10 s."""
    port = free_port()
    broker = StockBroker(port)
    try:
        for round_ in range(ROUNDS):
            broker.start()
            received = threading.Event()
            sub = _client(port, f"test-sub-{round_}")
            sub.on_message = lambda *_a, got=received: got.set()
            sub.subscribe("stream/#", 1)
            pub = _client(port, f"test-pub-{round_}")
            stop = threading.Event()

            def stream(pub: mqtt.Client = pub, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    pub.publish("stream/x", b"x" * 64, qos=1)
                    time.sleep(0.0005)

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            try:
                assert received.wait(5), "nothing flowed before the stop"
                time.sleep(0.05)
                started = time.monotonic()
                broker.stop(timeout=10.0)  # raises TimeoutError if the shutdown hangs
                assert time.monotonic() - started < 10.0
            finally:
                stop.set()
                streamer.join(5)
                for c in (pub, sub):
                    c.disconnect()
                for c in (pub, sub):  # each loop thread takes ~1 s to notice; wait in parallel
                    c.loop_stop()
    finally:
        broker.close()
