"""``blendsm broker -c FILE``: starts on the embedded chain, stops on SIGTERM, serves the
listeners of its config (here secure WebSocket with client certificates), and refuses a bad
config naming the field."""

from __future__ import annotations

import contextlib
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from support import TestCA, wait_until


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
