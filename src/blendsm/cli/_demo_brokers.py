"""The broker processes of ``blendsm demo --brokers N``: real ``blendsm broker`` processes on a
development chain served by the demo (:func:`~blendsm.contracts.start_dev_node`), so one of
them can be killed with SIGKILL, as a machine or a process dies, and started again.

Each process gets its own YAML, data directory and port under the demo's temporary folder,
and its operator's TEST-ONLY key in its environment (never in a file). Its output is read
by a thread (a pipe nobody reads fills up and blocks the broker's next log write) and the
last lines are kept for the error message if it does not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blendsm.errors import BrokerConnectionError

__all__ = ["BROKER_KEY_ENV", "KEY_ENV", "BrokerProcess"]

KEY_ENV = "BLENDSM_DEMO_OPERATOR_KEY"
"""The environment variable naming a broker process's TEST-ONLY operator key."""
BROKER_KEY_ENV = "BLENDSM_DEMO_BROKER_KEY"
"""... and the one naming its own TEST-ONLY broker key (its lane of every channel)."""
START_SECONDS = 60.0
"""How long a broker may take to sync its chain view and listen."""


@dataclass
class BrokerProcess:
    """One ``blendsm broker`` of the demo: ``name`` (``A1``, ``B1``...), its operator's label
    and TEST-ONLY key, and the YAML that :meth:`start` runs."""

    name: str
    operator: str
    """The label of the operator account that runs it."""
    port: int
    folder: Path
    key_hex: str
    """The operator's TEST-ONLY private key (hex), passed in the environment only."""
    broker_key_hex: str
    """The broker's own TEST-ONLY key (hex), registered in ``Brokers`` to its operator."""
    lane: str = ""
    """The broker key's address: its lane in every channel (set once registered)."""
    proc: subprocess.Popen[str] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    starts: int = 0

    def write_config(self, node_url: str, deployment: Path, sections: dict[str, Any]) -> None:
        """The broker's YAML: this port, the demo's chain, its own data directory."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "chain": {
                "endpoint": node_url,
                "deployment": str(deployment),
                "confirmations": 0,
                "poll_interval": 0.1,
            },
            "operator_key": {"env": KEY_ENV},
            "broker_key": {"env": BROKER_KEY_ENV},
            "data_dir": str(self.folder / "data"),
            "log_level": "ERROR",
            **sections,
        }
        # JSON is YAML: the broker reads it as its YAML config.
        (self.folder / "broker.yaml").write_text(json.dumps(config, indent=2))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and return once it listens (BrokerConnectionError, with its last
        output lines, if it exits or does not listen within :data:`START_SECONDS`)."""
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()  # a previous run's pipe (killed: its reader has ended)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blendsm.cli", "broker", "-c", str(self.folder / "broker.yaml")],
            env={**os.environ, KEY_ENV: self.key_hex, BROKER_KEY_ENV: self.broker_key_hex},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.starts += 1
        listening = threading.Event()
        stream = self.proc.stdout
        assert stream is not None  # stdout=PIPE

        def drain() -> None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    self.tail.append(line.rstrip())
                    if "listening on" in line:
                        listening.set()

        threading.Thread(target=drain, name=f"demo-broker-{self.name}", daemon=True).start()
        deadline = time.monotonic() + START_SECONDS
        while not listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise BrokerConnectionError(
                    f"broker {self.name} did not start: " + " | ".join(list(self.tail)[-5:])
                )

    def kill(self) -> None:
        """SIGKILL: no clean-up, no last claim, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, within: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``within`` s); its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(within)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode
