"""`blendsm market ...` against anvil over JSON-RPC: listing with prices, policies and seller
ratings, creating and changing topics, pausing, access lists; each checked against the Market
and Ratings contracts through plain web3, plus the errors (unknown topic, not the seller,
nothing to update, bad values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

SELLER, BUYER = 1, 2
OPEN, ALLOWLIST, DENYLIST, MIN_RATING = 0, 1, 2, 3
TOPIC = "sensors/berlin/temp"
TID = keccak(text=TOPIC)

Run = Callable[..., tuple[int, str, str]]
Process = Callable[..., subprocess.CompletedProcess[str]]  # the conftest's blendsm_process


@pytest.fixture(autouse=True)
def members(enrol: Callable[[str, int], None]) -> None:
    """The seller, a second seller ("operator" here) and two buyers are active."""
    for label, role in (
        ("seller", SELLER),
        ("operator", SELLER),
        ("buyer", BUYER),
        ("buyer2", BUYER),
    ):
        enrol(label, role)


def rate(chain: Any, send: Callable[..., Any], buyer: str, seller: str, score: int) -> None:
    """``buyer`` opens a channel to ``seller``, who settles it at once, then rates it."""
    pc = chain.PaymentChannels.functions
    receipt = send(
        pc.open(chain.addr(seller), "0x" + "00" * 20, "0x" + "00" * 20, 10**12, 0), buyer, 10**12
    )
    (opened,) = chain.PaymentChannels.events.ChannelOpened().process_receipt(receipt)
    channel_id = opened["args"]["channelId"]
    send(pc.cooperativeClose(channel_id, "0x" + "00" * 20, 0, b""), seller)  # no operator: lane 0
    send(chain.Ratings.functions.rate(channel_id, score), buyer)


def on_chain(chain: Any, topic_id: bytes = TID) -> dict[str, Any]:
    seller, paused, policy, min_rating, token, price, name = chain.Market.functions.topic(
        topic_id
    ).call()
    return {
        "seller": seller,
        "paused": paused,
        "policy": policy,
        "min_rating_x100": min_rating,
        "token": token,
        "price": price,
        "name": name,
        "encrypted": chain.Market.functions.isEncrypted(topic_id).call(),
    }


def check_tx(chain: Any, data: dict[str, Any]) -> None:
    receipt = chain.w3.eth.get_transaction_receipt(data["tx"])
    assert receipt["status"] == 1
    assert (receipt["blockNumber"], receipt["gasUsed"]) == (data["block"], data["gas_used"])


def test_create_human_with_defaults(chain: Any, cli: Run) -> None:
    code, out, err = cli("market", "create", TOPIC, "--price", "2gwei", key="seller")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"created topic {TOPIC} (0x{TID.hex()})"
    assert lines[1].startswith("  tx 0x")
    assert f"  seller    {chain.addr('seller')}  (rating unrated)" in lines
    assert "  price     2000000000 wei, native coin" in lines
    assert "  policy    open" in lines
    assert "  state     running, in clear" in lines
    assert on_chain(chain) == {
        "seller": chain.addr("seller"),
        "paused": False,
        "policy": OPEN,
        "min_rating_x100": 0,
        "token": "0x" + "00" * 20,
        "price": 2 * 10**9,
        "name": TOPIC,
        "encrypted": False,
    }


def test_create_json_with_token_min_rating_and_encryption(chain: Any, cli: Run) -> None:
    token = chain.Token.address
    code, out, _ = cli(
        "market", "create", TOPIC, "--price", "1500", "--token", token.lower(),
        "--min-rating", "4.5", "--encrypted", "--json", key="seller",
    )  # fmt: skip
    assert code == 0
    assert out.count("\n") == 1
    data = json.loads(out)
    check_tx(chain, data)
    check_tx(chain, data["encryption_tx"])
    topic = data["topic"]
    assert topic["topic_id"] == "0x" + TID.hex()
    assert (topic["token"], topic["native"], topic["price"]) == (token, False, 1500)
    assert (topic["policy"], topic["min_rating"], topic["min_rating_x100"]) == (
        "min-rating",
        4.5,
        450,
    )
    assert topic["encrypted"] is True
    assert topic["paused"] is False
    state = on_chain(chain)
    assert (state["token"], state["price"], state["policy"]) == (token, 1500, MIN_RATING)
    assert (state["min_rating_x100"], state["encrypted"]) == (450, True)


def test_create_refuses_bad_values_before_sending(chain: Any, cli: Run) -> None:
    cases = [
        (["--price", "1.5"], "--price: '1.5' is not a whole number of wei"),
        (["--price", "1", "--token", "0xabc"], "--token: not an address: '0xabc'"),
        (["--price", "1", "--min-rating", "5.5"], "--min-rating: must be between 1 and 5"),
        (["--price", "1", "--min-rating", "4.555"], "has more than two decimals"),
        (["--price", "1", "--min-rating", "high"], "is not a number"),
        (["--price", "1", "--policy", "min-rating"], "--policy min-rating needs --min-rating"),
        (
            ["--price", "1", "--policy", "allowlist", "--min-rating", "4"],
            "--min-rating only goes with --policy min-rating, not allowlist",
        ),
    ]
    for extra, message in cases:
        code, out, err = cli("market", "create", TOPIC, *extra, key="seller")
        assert (code, out) == (2, ""), extra
        assert err.startswith("blendsm: error: "), err
        assert message in err, (extra, err)
    assert chain.Market.functions.topicCount().call() == 0


def test_create_reverts_name_the_error(chain: Any, cli: Run) -> None:
    code, _, err = cli("market", "create", TOPIC, "--price", "1", key="buyer")
    assert code == 2
    assert err == f"blendsm: error: MarketNotActiveSeller(caller='{chain.addr('buyer')}')\n"
    assert cli("market", "create", TOPIC, "--price", "1", key="seller")[0] == 0
    code, _, err = cli("market", "create", TOPIC, "--price", "1", key="seller")
    assert code == 2
    assert "MarketTopicExists" in err
    code, _, err = cli("market", "create", "a/+/b", "--price", "1", key="seller")
    assert code == 2
    assert "MarketInvalidTopicName" in err
    code, _, err = cli("market", "create", TOPIC, "--price", "1")
    assert code == 2
    assert "environment variable BLENDSM_KEY is not set" in err


def test_list_shows_every_topic_with_the_sellers_rating(
    chain: Any, cli: Run, send: Callable[..., Any]
) -> None:
    code, out, _ = cli("market", "list")
    assert (code, out) == (0, "0 topics\n")
    assert cli("market", "list", "--json")[1] == '{"topics": []}\n'

    assert cli("market", "create", TOPIC, "--price", "0.001ether", key="seller")[0] == 0
    assert (
        cli("market", "create", "b/hum", "--price", "7", "--policy", "allowlist", key="seller")[0]
        == 0
    )
    args = ("--token", chain.Token.address, "--min-rating", "3", "--encrypted")
    assert cli("market", "create", "c/co2", "--price", "9", *args, key="operator")[0] == 0
    assert cli("market", "pause", "b/hum", key="seller")[0] == 0
    rate(chain, send, "buyer", "seller", 4)
    rate(chain, send, "buyer2", "seller", 5)
    assert tuple(chain.Ratings.functions.ratingOf(chain.addr("seller")).call()) == (2, 9)

    code, out, _ = cli("market", "list", "--json")
    topics = json.loads(out)["topics"]
    assert [t["name"] for t in topics] == [TOPIC, "b/hum", "c/co2"]
    for topic in topics:  # every field as the contracts hold it
        state = on_chain(chain, bytes.fromhex(topic["topic_id"][2:]))
        assert topic["topic_id"] == "0x" + keccak(text=topic["name"]).hex()
        for field in ("seller", "paused", "min_rating_x100", "price", "name", "encrypted"):
            assert topic[field] == state[field], field
        assert topic["token"] == (None if int(state["token"], 16) == 0 else state["token"])
        assert topic["policy"] == ["open", "allowlist", "denylist", "min-rating"][state["policy"]]
        count, total = chain.Ratings.functions.ratingOf(topic["seller"]).call()
        assert (topic["seller_rating"]["count"], topic["seller_rating"]["total"]) == (count, total)
    assert topics[0]["seller_rating"]["average"] == 4.5
    assert topics[0]["seller_rating"]["average_x100"] == 450
    assert topics[0]["price"] == 10**15
    assert topics[0]["native"] is True
    assert topics[1]["paused"] is True
    assert topics[1]["policy"] == "allowlist"
    assert topics[2]["seller_rating"] == {
        "average": None,
        "average_x100": 0,
        "count": 0,
        "total": 0,
    }
    assert (topics[2]["min_rating"], topics[2]["encrypted"]) == (3.0, True)

    code, out, _ = cli("market", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "3 topics"
    assert lines[1:7] == [
        TOPIC,
        f"  id        0x{TID.hex()}",
        f"  seller    {chain.addr('seller')}  (rating 4.50 from 2 ratings)",
        f"  price     0.001 ETH ({10**15} wei), native coin",
        "  policy    open",
        "  state     running, in clear",
    ]
    assert "  state     paused, in clear" in lines
    assert f"  price     9 units of token {chain.Token.address}" in lines
    assert "  policy    min-rating (buyers rated 3.00 or better)" in lines
    assert f"  seller    {chain.addr('operator')}  (rating unrated)" in lines


def test_show_by_name_and_id_with_the_access_list(chain: Any, cli: Run) -> None:
    assert (
        cli("market", "create", TOPIC, "--price", "5", "--policy", "allowlist", key="seller")[0]
        == 0
    )
    buyer, buyer2 = chain.addr("buyer"), chain.addr("buyer2")
    assert cli("market", "access", TOPIC, "--add", buyer, buyer2, key="seller")[0] == 0
    assert cli("market", "access", TOPIC, "--remove", buyer2, key="seller")[0] == 0

    code, out, _ = cli("market", "show", TOPIC)
    assert code == 0
    assert out.splitlines()[0] == TOPIC
    assert "  seller is active (seller)" in out
    assert f"  allowlist {buyer}\n" in out

    code, out, _ = cli("market", "show", "0x" + TID.hex(), "--json")
    data = json.loads(out)
    assert (data["name"], data["listed"], data["seller_status"]) == (TOPIC, [buyer], "active")
    assert chain.Market.functions.isListed(TID, buyer).call()
    assert not chain.Market.functions.isListed(TID, buyer2).call()


def test_unknown_topic_is_a_clear_error(chain: Any, cli: Run) -> None:
    for args, key in (
        (["show", "no/such"], None),
        (["update", "no/such", "--price", "1"], "seller"),
        (["pause", "no/such"], "seller"),
        (["access", "no/such", "--add", chain.addr("buyer")], "seller"),
    ):
        code, out, err = cli("market", *args, key=key)
        assert (code, out) == (2, "")
        assert err == (
            f"blendsm: error: unknown topic 'no/such' (id 0x{keccak(text='no/such').hex()})\n"
        )


def test_update_changes_only_what_is_given(chain: Any, cli: Run) -> None:
    assert cli("market", "create", TOPIC, "--price", "100", key="seller")[0] == 0
    code, out, _ = cli("market", "update", TOPIC, "--price", "250", key="seller")
    assert code == 0
    assert out.splitlines()[0] == f"updated topic {TOPIC}: price"
    assert out.splitlines()[1].startswith("price: tx 0x")
    state = on_chain(chain)
    assert (state["price"], state["policy"], state["encrypted"]) == (250, OPEN, False)

    code, out, _ = cli(
        "market", "update", TOPIC, "--min-rating", "4.25", "--encrypted", "--json", key="seller"
    )
    data = json.loads(out)
    assert [step["change"] for step in data["transactions"]] == ["policy", "encryption"]
    for step in data["transactions"]:
        check_tx(chain, step)
    assert (data["topic"]["policy"], data["topic"]["min_rating"]) == ("min-rating", 4.25)
    state = on_chain(chain)
    assert (state["price"], state["policy"], state["min_rating_x100"]) == (250, MIN_RATING, 425)
    assert state["encrypted"] is True

    # --policy min-rating alone keeps the threshold; another policy clears it.
    assert cli("market", "update", TOPIC, "--policy", "min-rating", key="seller")[0] == 0
    assert on_chain(chain)["min_rating_x100"] == 425
    code, out, _ = cli(
        "market", "update", TOPIC, "--policy", "denylist", "--no-encrypted", "--json", key="seller"
    )
    assert code == 0
    state = on_chain(chain)
    assert (state["policy"], state["min_rating_x100"], state["encrypted"]) == (DENYLIST, 0, False)
    assert state["price"] == 250


def test_update_errors(chain: Any, cli: Run) -> None:
    assert cli("market", "create", TOPIC, "--price", "100", key="seller")[0] == 0
    code, out, err = cli("market", "update", TOPIC, key="seller")
    assert (code, out) == (2, "")
    assert err.startswith("blendsm: error: market update: nothing to update")
    code, _, err = cli("market", "update", TOPIC, "--no-encrypted", "--price", "7", key="seller")
    assert code == 2
    assert f"topic {TOPIC} is already in clear; nothing sent" in err
    code, _, err = cli("market", "update", TOPIC, "--policy", "min-rating", key="seller")
    assert code == 2
    assert "--policy min-rating needs --min-rating" in err
    code, _, err = cli("market", "update", TOPIC, "--min-rating", "0.5", key="seller")
    assert code == 2
    assert "--min-rating: must be between 1 and 5" in err
    code, _, err = cli("market", "update", TOPIC, "--price", "1", key="operator")
    assert code == 2
    assert err.startswith("blendsm: error: MarketNotSeller(")
    assert chain.addr("operator") in err
    assert on_chain(chain)["price"] == 100  # nothing changed by any of these


def test_pause_and_resume(chain: Any, cli: Run) -> None:
    assert cli("market", "create", TOPIC, "--price", "1", key="seller")[0] == 0
    code, out, _ = cli("market", "pause", TOPIC, key="seller")
    assert code == 0
    assert out.startswith(f"topic {TOPIC} paused (nobody may subscribe or publish)\n  tx 0x")
    assert on_chain(chain)["paused"] is True
    code, _, err = cli("market", "pause", TOPIC, key="seller")
    assert code == 2
    assert "MarketPauseUnchanged" in err
    code, _, err = cli("market", "resume", TOPIC, key="operator")
    assert code == 2
    assert "MarketNotSeller" in err
    code, out, _ = cli("market", "resume", "0x" + TID.hex(), "--json", key="seller")
    data = json.loads(out)
    assert (data["action"], data["paused"], data["name"]) == ("resume", False, TOPIC)
    check_tx(chain, data)
    assert on_chain(chain)["paused"] is False


def test_access_add_and_remove(chain: Any, cli: Run) -> None:
    assert (
        cli("market", "create", TOPIC, "--price", "1", "--policy", "denylist", key="seller")[0] == 0
    )
    buyer, buyer2 = chain.addr("buyer"), chain.addr("buyer2")
    market = chain.Market.functions
    assert market.canSubscribe(buyer, TID).call()
    code, out, _ = cli("market", "access", TOPIC, "--add", buyer.lower(), buyer2, key="seller")
    assert code == 0
    assert out.startswith(f"put 2 accounts on the denylist of {TOPIC}\n  {buyer}\n  {buyer2}\n")
    assert market.isListed(TID, buyer).call()
    assert market.isListed(TID, buyer2).call()
    assert not market.canSubscribe(buyer, TID).call()

    code, out, _ = cli("market", "access", TOPIC, "--remove", buyer, "--json", key="seller")
    data = json.loads(out)
    assert (data["accounts"], data["listed"], data["policy"]) == ([buyer], False, "denylist")
    check_tx(chain, data)
    assert not market.isListed(TID, buyer).call()
    assert market.isListed(TID, buyer2).call()
    assert market.canSubscribe(buyer, TID).call()

    assert cli("market", "update", TOPIC, "--policy", "open", key="seller")[0] == 0
    code, out, _ = cli("market", "access", TOPIC, "--add", buyer, key="seller")
    assert "(the list has no effect while the policy is open)" in out

    code, _, err = cli("market", "access", TOPIC, "--add", "0xnope", key="seller")
    assert code == 2
    assert err == "blendsm: error: ADDR: not an address: '0xnope'\n"
    code, _, err = cli("market", "access", TOPIC, "--add", buyer, key="buyer")
    assert code == 2
    assert "MarketNotSeller" in err


def test_subprocess_list_and_a_revert(
    chain: Any, cli: Run, deployment_file: Path, blendsm_process: Process
) -> None:
    assert cli("market", "create", TOPIC, "--price", "3", key="seller")[0] == 0
    env = {
        **os.environ,
        "BLENDSM_CHAIN": chain.anvil.url,
        "BLENDSM_DEPLOYMENT": str(deployment_file),
    }
    blendsm = [str(Path(sys.executable).parent / "blendsm")]  # the installed console script
    done = blendsm_process("market", "list", "--json", env=env, program=blendsm)
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)["topics"]] == [TOPIC]
    env["BLENDSM_KEY"] = "0x" + chain.accounts["buyer"].key.hex()
    done = blendsm_process("market", "pause", TOPIC, env=env, program=blendsm)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("blendsm: error: MarketNotSeller(")
    assert on_chain(chain)["paused"] is False
