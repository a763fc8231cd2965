"""Fixtures shared by the command-line tests: the deployment file of the test chain, the
``blendsm`` runner (in-process and as a child process) and enrolment through plain web3."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import EllipsisType
from typing import Any

import pytest
from support import enrol_raw

from blendsm.cli import main


@pytest.fixture
def deployment_file(chain: Any, tmp_path: Path) -> Path:
    """The test chain's deployment, saved where ``--deployment`` can read it."""
    path = tmp_path / "deployment.json"
    chain.deployment.save(path)
    return path


class Cli:
    """``cli(*argv, key=label)``: run ``blendsm`` in-process on the test chain (its anvil node
    and deployment file, unless ``--chain`` or ``--deployment`` is given), signing as
    ``label``: None leaves BLENDSM_KEY unset, no ``key`` means :attr:`signer`. Returns
    (exit code, stdout, stderr)."""

    def __init__(
        self,
        chain: Any,
        deployment: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        assert chain.anvil is not None
        self._chain = chain
        self._deployment = deployment
        self._monkeypatch = monkeypatch
        self._capsys = capsys
        #: The label that signs when a call names no ``key``.
        self.signer: str | None = None

    def __call__(self, *argv: str, key: str | EllipsisType | None = ...) -> tuple[int, str, str]:
        label = self.signer if key is ... else key
        if label is None:
            self._monkeypatch.delenv("BLENDSM_KEY", raising=False)
        else:
            self._monkeypatch.setenv("BLENDSM_KEY", "0x" + self._chain.accounts[label].key.hex())
        words = [*argv]
        if "--chain" not in words:
            words += ["--chain", self._chain.anvil.url]
        if "--deployment" not in words:
            words += ["--deployment", str(self._deployment)]
        self._capsys.readouterr()
        code = main(words)
        out, err = self._capsys.readouterr()
        return code, out, err

    @staticmethod
    def json(out: str) -> dict[str, Any]:
        """The one JSON object ``out`` holds, on a line of its own."""
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        data = json.loads(lines[0])
        assert isinstance(data, dict)
        return data


@pytest.fixture
def cli(
    chain: Any,
    deployment_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Cli:
    """See :class:`Cli`; no key unless a call names one."""
    return Cli(chain, deployment_file, monkeypatch, capsys)


@pytest.fixture
def blendsm_process() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``blendsm_process(*args, env=..., timeout=60)``: ``python -m blendsm.cli *args``
    in a child process, its output captured as text; ``program`` runs another command
    (such as the installed ``blendsm`` script) instead."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        program: list[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = program or [sys.executable, "-m", "blendsm.cli"]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )

    return run


@pytest.fixture
def send(chain: Any) -> Callable[..., Any]:
    """Transact a contract call from a label through plain web3; the successful receipt."""

    def transact(call: Any, label: str, value: int = 0) -> Any:
        tx_hash = call.transact({"from": chain.addr(label), "value": value})
        receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        return receipt

    return transact


@pytest.fixture
def enrol(chain: Any, send: Callable[..., Any]) -> Callable[[str, int], None]:
    """Apply with ``role`` and have the oracle approve, through plain web3."""
    return lambda label, role: enrol_raw(chain, send, label, role)
