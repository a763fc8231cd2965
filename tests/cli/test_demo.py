"""``blendsm demo`` end to end, as a user runs it: a subprocess on the embedded chain, its
JSON line checked for the money and integrity invariants, and the human summary once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TIMEOUT = 120


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "blendsm.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def test_demo_json_line_balances_every_wei_and_proves_the_messages() -> None:
    done = _demo("--duration", "3", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    d = json.loads(done.stdout.strip().splitlines()[-1])
    assert d["invariants_hold"] is True
    assert d["problems"] == []
    assert d["messages_published"] > 0
    assert d["messages_delivered"] > 0
    assert d["anchors"] >= 1
    assert d["proofs_verified"] >= 1
    assert d["proofs_failed"] == 0
    assert d["signature_failures"] == 0
    assert d["gas_used"] > 0
    # Money: delivered x price == vouchered == settled on chain, per channel and in total.
    assert d["channels"]
    for ch in d["channels"]:
        assert ch["delivered"] > 0
        assert ch["delivered_value"] == ch["vouchered"] == ch["charged"] == ch["settled_onchain"]
        assert ch["payout_to_seller"] + ch["fee_to_operator"] == ch["settled_onchain"]
        assert ch["payout_to_seller"] + ch["fee_to_operator"] + ch["refund"] == ch["deposit"]
    assert d["amount_vouchered"] == d["amount_settled_onchain"] > 0
    assert d["messages_delivered"] == sum(ch["delivered"] for ch in d["channels"])
    assert d["fees_to_operator"] > 0
    assert d["paid_to_seller"] + d["fees_to_operator"] + d["refunded_to_buyers"] == d["deposits"]
    assert d["messages_decrypted"] > 0  # the encrypted topic reached both buyers readable
    assert d["ratings"] == 2 * d["buyers"]


def test_demo_human_summary_says_the_invariants_hold() -> None:
    done = _demo("--duration", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BlendSM demo summary" in done.stdout
    assert "All invariants hold" in done.stdout
    # Not a TTY here: progress comes as periodic lines on stderr.
    assert "streaming signed readings" in done.stderr
    assert "delivered" in done.stderr


def test_demo_refuses_a_non_positive_duration() -> None:
    done = _demo("--duration", "0")
    assert done.returncode == 2
    assert "--duration" in done.stderr
