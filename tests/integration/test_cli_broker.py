"""``blendsm broker -c FILE``: starts on the embedded chain, stops on SIGTERM, serves the
listeners of its config (here secure WebSocket with client certificates), and refuses a bad
config naming the field."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import Client, TestCA, oversized_publish, wait_until


def _blendsm(*args: str) -> list[str]:
    return [sys.executable, "-m", "blendsm.cli", *args]


@contextlib.contextmanager
def _broker(config: Path) -> Iterator[subprocess.Popen[str]]:
    """``blendsm broker -c config`` (stdout and stderr merged), killed if still running."""
    proc = subprocess.Popen(
        _blendsm("broker", "-c", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def test_broker_runs_on_the_embedded_chain_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("listen:\n  port: 0\ndata_dir: data\nlog_level: warning\n")
    with _broker(config) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "blendsm broker listening on 127.0.0.1:" in line, line
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "blendsm broker stopping" in out
    assert (tmp_path / "data" / "vouchers.sqlite3").is_file()


def test_broker_refuses_an_invalid_config_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("payments:\n  credit_mesages: 5\n")
    done = subprocess.run(
        _blendsm("broker", "-c", str(config)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "payments.credit_mesages: unknown key; did you mean 'credit_messages'?" in done.stderr


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


def _start(tmp_path: Path, limits: str) -> tuple[subprocess.Popen[str], int]:
    config = tmp_path / "broker.yaml"
    config.write_text(
        "listen:\n  port: 0\ndata_dir: data\nlog_level: warning\npublic_topics: true\n"
        f"limits:\n{limits}"
    )
    proc = subprocess.Popen(
        _blendsm("broker", "-c", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "blendsm broker listening on 127.0.0.1:" in line, line
    return proc, int(line.split("127.0.0.1:")[1].split()[0])


def test_a_128_mb_publish_is_refused_without_growing_the_broker(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "  max_packet_bytes: 1048576\n")
    try:
        before = _rss_bytes(proc.pid)
        closed_after, taken = oversized_publish(port, "public/big", 128 * 1024 * 1024)
        after = _rss_bytes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert closed_after is not None, "a PUBLISH announcing 128 MB was read on for 10 s"
    assert closed_after < 2.0
    assert taken < 16 * 1024 * 1024
    # honest bound: the stock broker buffered the whole body (RSS 93 -> 463 MB)
    assert after - before < 20 * 1024 * 1024, (before, after)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_broker_exits_0_within_the_bound_with_qos_traffic_in_flight(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc, port = _start(tmp_path, "  shutdown_seconds: 3\n")
    clients: list[Client] = []
    try:
        sub = Client("127.0.0.1", port)
        clients.append(sub)
        assert await sub.connect() == 0
        assert await sub.subscribe("public/load/#", 2) == [2]
        pub = Client("127.0.0.1", port)
        clients.append(pub)
        assert await pub.connect() == 0
        for i in range(200):  # not awaited: in flight when the signal arrives
            pub.mqtt.publish("public/load/x", b"%d" % i, qos=1 + i % 2)
        proc.send_signal(sig)
        started = time.monotonic()
        out, _ = await asyncio.to_thread(proc.communicate, None, 30)
        took = time.monotonic() - started
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "blendsm broker stopping" in out
    assert took < 3 + 10, took  # shutdown_seconds, plus closing the stores and the interpreter


def test_broker_serves_the_listeners_of_its_config(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "certs")
    ca.issue("server", "127.0.0.1", server=True)
    device = ca.issue("client", "gateway-17", server=False)
    config = tmp_path / "broker.yaml"
    config.write_text(
        "listeners:\n"
        "  local: {port: 0}\n"
        "  browsers:\n"
        "    type: ws\n"
        "    port: 0\n"
        "    tls: {certfile: certs/server.crt, keyfile: certs/server.key,\n"
        "          cafile: certs/ca.crt, require_client_cert: true}\n"
        "data_dir: data\npublic_topics: true\nlog_level: warning\n"
    )
    with _broker(config) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert "blendsm broker listening on 127.0.0.1:" in lines[0], lines
        assert lines[1].startswith("  local: mqtt://127.0.0.1:"), lines
        assert lines[2].startswith("  browsers: wss://127.0.0.1:"), lines
        port = int(lines[2].rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=ca.cert)
        context.load_cert_chain(device.cert, device.key)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, transport="websockets")
        client.tls_set_context(context)
        got: list[bytes] = []
        client.on_message = lambda _c, _u, m: got.append(m.payload)
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            client.subscribe("public/cli", 1)
            wait_until(lambda: client.is_connected(), 10, what="CONNACK over wss")
            info = client.publish("public/cli", b"over wss", qos=1)
            info.wait_for_publish(10)
            wait_until(lambda: got == [b"over wss"], 10, what="the message back over wss")
        finally:
            client.disconnect()
            client.loop_stop()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_port_override_is_refused_with_listeners(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("listeners:\n  a: {port: 0}\n")
    done = subprocess.run(
        _blendsm("broker", "-c", str(config), "--port", "1999"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--port: overrides listen.port only" in done.stderr
