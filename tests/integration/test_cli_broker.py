"""``blendsm broker -c FILE``: starts on the embedded chain, stops on SIGTERM, and refuses a bad
config naming the field."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def _blendsm(*args: str) -> list[str]:
    return [sys.executable, "-m", "blendsm.cli", *args]


def test_broker_runs_on_the_embedded_chain_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("listen:\n  port: 0\ndata_dir: data\nlog_level: warning\n")
    proc = subprocess.Popen(
        _blendsm("broker", "-c", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "blendsm broker listening on 127.0.0.1:" in line, line
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
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
