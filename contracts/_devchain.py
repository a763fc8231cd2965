"""Development chains: the in-process EVM and an anvil node on loopback.

Both hold only TEST keys: :func:`test_account` derives well-known keys from a label, so
never send value to them on a real network. The embedded chain is what ``blendsm demo``
and most tests run on; :class:`AnvilNode` starts the anvil binary shipped by the npm
package ``@foundry-rs/anvil-linux-amd64`` (``npm ci``) as a real JSON-RPC node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from blendsm.errors import ChainUnavailableError, ConfigError

__all__ = ["AnvilNode", "find_anvil", "free_port", "new_embedded_chain", "test_account"]


def test_account(label: str) -> LocalAccount:
    """A deterministic TEST-ONLY account: its key is keccak256("blendsm-test:" + label)."""
    key: LocalAccount = Account.from_key(keccak(text=f"blendsm-test:{label}"))
    return key


# Not a test, despite its name: pytest would collect it from any test module importing it.
test_account.__test__ = False  # type: ignore[attr-defined]


def new_embedded_chain(fund: list[str] | None = None, amount: int = 10**23) -> Any:
    """A fresh in-process EVM (eth-tester + py-evm) with ``fund`` addresses given ``amount`` wei."""
    from eth_tester import EthereumTester, PyEVMBackend

    tester = EthereumTester(PyEVMBackend())
    source = tester.get_accounts()[0]
    for address in fund or []:
        tester.send_transaction({"from": source, "to": address, "value": amount, "gas": 21_000})
    return tester


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_anvil(start: Path | None = None) -> str:
    """The anvil binary: $BLENDSM_ANVIL, else node_modules/@foundry-rs/anvil-*/bin/anvil
    above ``start`` (default: this checkout), else ``anvil`` on PATH."""
    env = os.environ.get("BLENDSM_ANVIL")
    if env:
        return env
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        for candidate in sorted(
            (parent / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil")
        ):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("anvil")
    if found:
        return found
    raise ConfigError("anvil not found: run `npm ci` in the checkout or set BLENDSM_ANVIL")


class AnvilNode:
    """An anvil process bound to 127.0.0.1; stop and start it again on the same port
    (with its state dumped and reloaded) to test what a node restart does to clients."""

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = 31337,
        block_time: float | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.chain_id = chain_id
        self.block_time = block_time
        self.state_file = state_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> AnvilNode:
        if self.process is not None and self.process.poll() is None:
            return self
        args = [
            find_anvil(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--silent",
            "--accounts",
            "2",
        ]
        if self.block_time:
            args += ["--block-time", str(self.block_time)]
        if self.state_file is not None:
            args += ["--state", str(self.state_file)]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChainUnavailableError(f"anvil exited with {self.process.returncode}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise ChainUnavailableError(f"anvil did not answer on {self.url} within {timeout}s")

    def ready(self) -> bool:
        body = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'
        req = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the node (SIGTERM, so ``--state`` is written), SIGKILL if it lingers."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> AnvilNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
