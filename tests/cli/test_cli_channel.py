"""`blendsm channel ...` and `blendsm rate` against anvil over JSON-RPC, every result
checked against the chain with plain synchronous web3."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from blendsm.contracts import free_port
from blendsm.device_sdk import VoucherDomain, sign_voucher

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

ETHER = 10**18
CHALLENGE_PERIOD = 3600
BUYER_ROLE = 2
SELLER_ROLE = 1

Cli = Any  # the conftest's runner: cli(*argv, key=label) -> (code, out, err); cli.json(out)
Process = Callable[..., subprocess.CompletedProcess[str]]  # the conftest's blendsm_process


@pytest.fixture
def cli(cli: Cli) -> Cli:
    """The shared runner, signing as "buyer" unless a call names another ``key``."""
    cli.signer = "buyer"
    return cli


def _open_argv(chain: Any, deposit: str, *extra: str, payee: str | None = None) -> list[str]:
    """``channel open`` to "seller" (or ``payee``), run by "operator", with ``extra`` words."""
    return [
        "channel",
        "open",
        "--payee",
        payee or chain.addr("seller"),
        "--operator",
        chain.addr("operator"),
        "--deposit",
        deposit,
        *extra,
    ]


def _open(
    cli: Cli, chain: Any, payer: str = "buyer", deposit: str = "1ether", fee: int = 50
) -> bytes:
    code, out, err = cli(*_open_argv(chain, deposit, "--fee-bps", str(fee), "--json"), key=payer)
    assert code == 0, err
    return bytes.fromhex(cli.json(out)["channel"][2:])


def _onchain(chain: Any, channel_id: bytes) -> dict[str, Any]:
    c = chain.PaymentChannels.functions.channel(channel_id).call()
    names = [
        "payer",
        "fee_bps",
        "closes_at",
        "settled",
        "payee",
        "operator",
        "token",
        "deposit",
        "claimed",
    ]
    return dict(zip(names, c, strict=True))


def _gas_cost(chain: Any, tx: str) -> int:
    receipt = chain.w3.eth.get_transaction_receipt(tx)
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def _claim(chain: Any, channel_id: bytes, amount: int, payer: str = "buyer") -> None:
    """What the broker does: submit the payer's voucher (here signed with the SDK)."""
    domain = VoucherDomain(chain.deployment.chain_id, chain.deployment.address("PaymentChannels"))
    lane = chain.addr("operator")  # the channels here name it: its own lane
    voucher = sign_voucher(bytes(chain.accounts[payer].key), domain, channel_id, lane, amount)
    tx = chain.PaymentChannels.functions.claim(
        channel_id, lane, amount, voucher.signature
    ).transact({"from": chain.addr("operator")})
    assert chain.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1


def test_channel_lifecycle_open_top_up_close_withdraw(chain: Any, cli: Cli) -> None:
    buyer = chain.addr("buyer")
    start = chain.w3.eth.get_balance(buyer)

    code, out, err = cli(
        *_open_argv(
            chain, "1ether", "--fee-bps", "50", "--json", payee=chain.addr("seller").lower()
        )
    )
    assert code == 0, err
    opened = cli.json(out)
    channel_id = bytes.fromhex(opened["channel"][2:])
    state = _onchain(chain, channel_id)
    assert state["payer"] == buyer
    assert state["payee"] == chain.addr("seller")
    assert state["operator"] == chain.addr("operator")
    assert state["fee_bps"] == 50
    assert state["deposit"] == ETHER
    assert state["claimed"] == 0
    assert opened["deposit"] == ETHER
    assert opened["payee"] == chain.addr("seller")
    assert opened["approval"] is None
    open_cost = _gas_cost(chain, opened["tx"])
    assert chain.w3.eth.get_balance(buyer) == start - ETHER - open_cost

    code, out, err = cli("channel", "status", "0x" + channel_id.hex(), key=None)
    assert code == 0, err
    assert "state      open" in out
    assert f"payee      {chain.addr('seller')}" in out
    assert "fee 50 bps = 0.5 %" in out
    assert "deposit    1 ETH (1000000000000000000 wei)" in out

    code, out, err = cli("channel", "top-up", "0x" + channel_id.hex(), "0.5ether")
    assert code == 0, err
    assert "deposit now 1.5 ETH" in out
    assert "tx 0x" in out
    assert _onchain(chain, channel_id)["deposit"] == 3 * ETHER // 2

    code, out, err = cli("channel", "request-close", "0x" + channel_id.hex(), "--json")
    assert code == 0, err
    closing = cli.json(out)
    closes_at = _onchain(chain, channel_id)["closes_at"]
    assert closing["closes_at"] == closes_at == chain.now() + CHALLENGE_PERIOD

    # Too early: refused before anything is sent (the nonce does not move).
    nonce = chain.w3.eth.get_transaction_count(buyer)
    balance = chain.w3.eth.get_balance(buyer)
    code, out, err = cli("channel", "withdraw", "0x" + channel_id.hex())
    assert code == 2
    assert out == ""
    assert err.startswith("blendsm: error: ")
    assert err.count("\n") == 1
    assert "challenge period runs until" in err
    assert "no transaction sent" in err
    assert chain.w3.eth.get_transaction_count(buyer) == nonce
    assert chain.w3.eth.get_balance(buyer) == balance

    code, out, err = cli("channel", "status", "0x" + channel_id.hex(), "--json", key=None)
    assert code == 0, err
    status = cli.json(out)
    assert status["state"] == "closing"
    assert status["closing"] is True
    assert status["closes_at"] == closes_at
    assert 0 < status["seconds_left"] <= CHALLENGE_PERIOD
    assert status["deposit"] == 3 * ETHER // 2
    assert status["remaining"] == 3 * ETHER // 2

    chain.time_travel(CHALLENGE_PERIOD + 1)
    code, out, err = cli("channel", "status", "0x" + channel_id.hex(), key=None)
    assert "can withdraw the remaining deposit now" in out

    code, out, err = cli("channel", "withdraw", "0x" + channel_id.hex(), "--json")
    assert code == 0, err
    settled = cli.json(out)
    assert settled["refund"] == 3 * ETHER // 2
    assert _onchain(chain, channel_id)["settled"] is True
    assert chain.w3.eth.get_balance(buyer) == balance + 3 * ETHER // 2 - _gas_cost(
        chain, settled["tx"]
    )

    code, out, err = cli("channel", "status", "0x" + channel_id.hex(), "--json", key=None)
    assert cli.json(out)["state"] == "settled"
    assert cli.json(out)["remaining"] == 0
    code, out, err = cli("channel", "withdraw", "0x" + channel_id.hex())
    assert code == 2
    assert "settled already" in err


def test_channel_open_human_and_in_token(chain: Any, cli: Cli) -> None:
    token = chain.Token
    buyer = chain.addr("buyer")
    tx = token.functions.mint(buyer, 1000).transact({"from": chain.addr("oracle")})
    chain.w3.eth.wait_for_transaction_receipt(tx)
    code, out, err = cli(*_open_argv(chain, "600", "--token", token.address))
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("Opened channel 0x")
    channel_id = bytes.fromhex(first.split()[-1][2:])
    assert "approved the token first" in out
    assert f"token     {token.address}" in out
    state = _onchain(chain, channel_id)
    assert state["token"] == token.address
    assert state["deposit"] == 600
    assert token.functions.balanceOf(buyer).call() == 400
    assert token.functions.balanceOf(chain.PaymentChannels.address).call() == 600

    code, out, err = cli("channel", "top-up", "0x" + channel_id.hex(), "100", "--json")
    assert code == 0, err
    assert cli.json(out)["deposit"] == 700 == _onchain(chain, channel_id)["deposit"]
    assert token.functions.balanceOf(buyer).call() == 300


def test_channel_list(chain: Any, cli: Cli) -> None:
    mine = _open(cli, chain, "buyer")
    theirs = _open(cli, chain, "buyer2", deposit="2ether", fee=0)
    code, out, err = cli("channel", "request-close", "0x" + mine.hex())
    assert code == 0, err

    code, out, err = cli("channel", "list", "--json")  # default: the signer's channels
    assert code == 0, err
    data = cli.json(out)
    assert data["address"] == chain.addr("buyer")
    assert data["role"] == "party"
    assert [c["channel"] for c in data["channels"]] == ["0x" + mine.hex()]
    assert data["channels"][0]["state"] == "closing"

    code, out, err = cli("channel", "list", "--payee", chain.addr("seller"), "--json", key=None)
    ids = [c["channel"] for c in cli.json(out)["channels"]]
    assert ids == ["0x" + mine.hex(), "0x" + theirs.hex()]
    listed = {c["channel"]: c for c in cli.json(out)["channels"]}
    assert listed["0x" + theirs.hex()]["deposit"] == _onchain(chain, theirs)["deposit"] == 2 * ETHER

    code, out, err = cli("channel", "list", "--payer", chain.addr("buyer2"), "--json", key=None)
    assert [c["channel"] for c in cli.json(out)["channels"]] == ["0x" + theirs.hex()]
    code, out, err = cli("channel", "list", "--operator", chain.addr("operator"), key=None)
    assert code == 0
    assert out.startswith("2 channels")
    assert "0x" + theirs.hex() + "  open" in out
    code, out, err = cli("channel", "list", key="stranger")
    assert code == 0
    assert out.startswith("0 channels")
    code, out, err = cli("channel", "list", key=None)
    assert code == 2
    assert "give --payer, --payee, --operator or --address" in err


def test_rate_after_a_claim(chain: Any, cli: Cli, enrol: Callable[[str, int], None]) -> None:
    channel_id = _open(cli, chain, "buyer")
    cid = "0x" + channel_id.hex()

    code, out, err = cli("rate", cid, "4")
    assert code == 2
    assert "paid no claim" in err

    _claim(chain, channel_id, ETHER // 10)
    # The buyer is no Registry participant: the contract refuses, the error names why.
    code, out, err = cli("rate", cid, "4")
    assert code == 2
    assert "RatingsRaterNotActive" in err
    assert err.startswith("blendsm: error: ")

    enrol("buyer", BUYER_ROLE)

    for bad in ("0", "6", "x"):
        code, out, err = cli("rate", cid, bad)
        assert code == 2
        assert "from 1 to 5" in err
    code, out, err = cli("rate", cid, "4", key="stranger")
    assert code == 2
    assert "neither the payer" in err

    code, out, err = cli("rate", cid, "4", "--json")
    assert code == 0, err
    rated = cli.json(out)
    assert rated["ratee"] == chain.addr("seller")
    assert rated["rater"] == chain.addr("buyer")
    assert rated["score"] == 4
    assert rated["ratee_average_x100"] == 400
    assert chain.Ratings.functions.ratingOf(chain.addr("seller")).call() == [1, 4]
    assert chain.Ratings.functions.hasRated(channel_id, chain.addr("buyer")).call() is True

    code, out, err = cli("rate", cid, "5")
    assert code == 2
    assert "already rated" in err
    assert chain.Ratings.functions.ratingOf(chain.addr("seller")).call() == [1, 4]


def test_rate_human_as_payee(chain: Any, cli: Cli, enrol: Callable[[str, int], None]) -> None:
    channel_id = _open(cli, chain, "buyer")
    _claim(chain, channel_id, ETHER // 10)
    enrol("seller", SELLER_ROLE)
    code, out, err = cli("rate", "0x" + channel_id.hex(), "2", key="seller")
    assert code == 0, err
    assert out.startswith(
        f"Rated {chain.addr('buyer')} 2/5 for channel 0x{channel_id.hex()} (as its payee)"
    )
    assert "average is now 2.00 from 1 rating" in out
    assert chain.Ratings.functions.ratingOf(chain.addr("buyer")).call() == [1, 2]


def test_errors(chain: Any, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = "0x" + "ab" * 32
    for argv in (
        ("channel", "status", unknown),
        ("channel", "top-up", unknown, "1"),
        ("channel", "request-close", unknown),
        ("channel", "withdraw", unknown),
        ("rate", unknown, "3"),
    ):
        code, out, err = cli(*argv)
        assert code == 2
        assert out == ""
        assert (
            err
            == f"blendsm: error: no channel {unknown} on PaymentChannels {chain.deployment.address('PaymentChannels')}\n"
        )

    code, out, err = cli("channel", "status", "0x1234")
    assert code == 2
    assert "channel: expected 0x and 64 hex digits" in err
    for argv, key, message in (
        (_open_argv(chain, "1", payee="0xnope"), "buyer", "--payee: not an address"),
        (_open_argv(chain, "lots"), "buyer", "--deposit: 'lots' is not an amount"),
        (_open_argv(chain, "1", "--fee-bps", "2000"), "buyer", "--fee-bps: at most 1000"),
        # A revert the CLI does not pre-check: the custom error's name reaches the user.
        (
            _open_argv(chain, "1", payee=chain.addr("buyer")),
            "buyer",
            "PaymentChannelsInvalidPayee",
        ),
        (_open_argv(chain, "1"), None, "BLENDSM_KEY"),
    ):
        code, out, err = cli(*argv, key=key)
        assert code == 2, argv
        assert message in err, (argv, err)

    channel_id = _open(cli, chain, "buyer")
    code, out, err = cli("channel", "withdraw", "0x" + channel_id.hex())
    assert code == 2
    assert "is not closing" in err
    assert "request-close" in err
    code, out, err = cli("channel", "request-close", "0x" + channel_id.hex(), key="seller")
    assert code == 2
    assert "PaymentChannelsNotPayer" in err

    port = free_port()
    code, out, err = cli(
        "channel",
        "status",
        "0x" + channel_id.hex(),
        "--chain",
        f"http://127.0.0.1:{port}",
        key=None,
    )
    assert code == 2
    assert err.startswith("blendsm: error: ")
    assert err.count("\n") == 1
    assert "unavailable" in err
    assert f"127.0.0.1:{port}" in err
    code, out, err = cli(
        "channel",
        "status",
        "0x" + channel_id.hex(),
        "--deployment",
        str(tmp_path / "nope.json"),
        key=None,
    )
    assert code == 2
    assert "does not exist" in err
    other = tmp_path / "other-chain.json"
    dataclasses.replace(chain.deployment, chain_id=chain.deployment.chain_id + 1).save(other)
    code, out, err = cli(
        "channel", "status", "0x" + channel_id.hex(), "--deployment", str(other), key=None
    )
    assert code == 2
    assert f"deployment is for chain id {chain.deployment.chain_id + 1}" in err


def test_keystore(chain: Any, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keystore = tmp_path / "buyer2.json"
    keystore.write_text(json.dumps(Account.encrypt(chain.accounts["buyer2"].key, "s3cret")))
    monkeypatch.setenv("BLENDSM_KEYSTORE_PASSWORD", "s3cret")
    code, out, err = cli(
        *_open_argv(chain, "3gwei", "--keystore", str(keystore), "--json"), key=None
    )
    assert code == 0, err
    channel_id = bytes.fromhex(cli.json(out)["channel"][2:])
    state = _onchain(chain, channel_id)
    assert state["payer"] == chain.addr("buyer2")
    assert state["deposit"] == 3 * 10**9


def test_subprocess_exit_codes(
    chain: Any, cli: Cli, deployment_file: Path, blendsm_process: Process
) -> None:
    channel_id = _open(cli, chain, "buyer")
    cid = "0x" + channel_id.hex()
    assert cli("channel", "request-close", cid)[0] == 0
    env = {**os.environ, "BLENDSM_KEY": "0x" + chain.accounts["buyer"].key.hex()}
    common = ["--chain", chain.anvil.url, "--deployment", str(deployment_file)]
    done = blendsm_process("channel", "status", cid, "--json", *common, env=env)
    assert done.returncode == 0, done.stderr
    assert cli.json(done.stdout)["closes_at"] == _onchain(chain, channel_id)["closes_at"]
    done = blendsm_process("channel", "withdraw", cid, *common, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("blendsm: error: channel ")
    assert "challenge period" in done.stderr
    assert _onchain(chain, channel_id)["settled"] is False
