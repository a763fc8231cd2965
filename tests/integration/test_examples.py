"""examples/: the walkthrough runs a broker, a buyer and a device as separate processes
against one anvil chain, and the buyer's summary balances."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "examples" / "walkthrough.py"


@pytest.mark.anvil
def test_walkthrough_runs_device_buyer_and_broker_as_processes() -> None:
    # No skips: CI installs anvil (npm ci) and the broker extra; a missing one must fail here.
    count, price = 8, 1_500
    result = subprocess.run(
        [sys.executable, str(WALKTHROUGH), "--count", str(count), "--price", str(price)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["received"] == count
    assert summary["paid"] == count
    assert summary["verified"] == count
    assert summary["vouchered_wei"] == count * price
    assert summary["confirmed_wei"] == count * price
