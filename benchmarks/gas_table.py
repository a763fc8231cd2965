"""Gas used by each marketplace operation, measured on the embedded chain; writes docs/gas.md.

    python benchmarks/gas_table.py [--output docs/gas.md]

Deploys the suite on a fresh in-process EVM (eth-tester + py-evm, the artifacts' EVM version),
walks a seller, two buyers and a broker operator through the life of a topic and two channels
with the typed bindings, and tabulates each receipt's ``gasUsed`` (the whole transaction: the
21,000 base and calldata included). Storage costs depend on history (a slot going from zero to
non-zero costs ~20k, a warm non-zero rewrite ~3k), so the first and a subsequent claim or
anchor are listed apart; both channel opens are their payer's first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from blendsm.contracts import (
    Market,
    Marketplace,
    Role,
    Transactor,
    TxResult,
    connect,
    deploy_suite,
    load_artifact,
    load_manifest,
    new_embedded_chain,
    test_account,
)
from blendsm.device_sdk import MerkleTree, leaf_hash, sign_voucher

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "docs" / "gas.md"
TOPIC = "farm/17/soil/moisture"
PRICE = 10**12
DEPOSIT = 10**18
FEE_BPS = 100
CHALLENGE_PERIOD = 3600


@dataclass(frozen=True)
class Row:
    operation: str
    call: str
    gas: int
    notes: str = ""


async def measure() -> list[Row]:
    """Run every operation once, in a realistic order, and collect the gas it used."""
    labels = ("oracle", "seller", "buyer", "buyer2", "operator", "device")
    accounts = {label: test_account(label) for label in labels}
    tester = new_embedded_chain(fund=[a.address for a in accounts.values()])
    w3 = connect("embedded", ethereum_tester=tester)
    deployment = await deploy_suite(w3, accounts["oracle"], challenge_period=CHALLENGE_PERIOD)
    mp = {label: Marketplace(w3, deployment, account) for label, account in accounts.items()}
    addr = {label: account.address for label, account in accounts.items()}
    rows: list[Row] = []

    def row(operation: str, call: str, result: TxResult | None, notes: str = "") -> None:
        assert result is not None
        rows.append(Row(operation, call, result.gas_used, notes))

    row(
        "Registry: apply for a role",
        "Registry.applyForRole",
        await mp["seller"].registry.apply_for_role(Role.SELLER),
        "new account",
    )
    row(
        "Registry: approve an applicant",
        "Registry.approve",
        await mp["oracle"].registry.approve(addr["seller"]),
        "oracle",
    )
    for label, role in (("buyer", Role.BUYER), ("buyer2", Role.BUYER), ("operator", Role.OPERATOR)):
        await mp[label].registry.apply_for_role(role)
        await mp["oracle"].registry.approve(addr[label])
    row(
        "Registry: add a device",
        "Registry.addDevice",
        await mp["seller"].registry.add_device(addr["device"]),
        "seller's first device",
    )
    row(
        "Market: create a topic",
        "Market.createTopic",
        await mp["seller"].market.create_topic(TOPIC, PRICE),
        f"{len(TOPIC)}-byte name, native coin, open policy",
    )

    opened = await mp["buyer"].channels.open(
        addr["seller"], addr["operator"], None, DEPOSIT, FEE_BPS
    )
    row(
        "Channels: open (native coin)",
        "PaymentChannels.open",
        opened,
        f"payer's first channel, {FEE_BPS} bps fee",
    )
    token = await _deploy_token(w3, accounts["oracle"])
    await Transactor(w3, accounts["oracle"]).send(
        token.functions.mint(addr["buyer2"], 10 * DEPOSIT)
    )
    approval = await mp["buyer2"].channels.approve_token(token.address, DEPOSIT)
    row(
        "ERC-20: approve the channels contract",
        "ERC20.approve",
        approval,
        "before an ERC-20 open or top-up",
    )
    opened_erc20 = await mp["buyer2"].channels.open(
        addr["seller"], addr["operator"], token.address, DEPOSIT, FEE_BPS
    )
    row(
        "Channels: open (ERC-20)",
        "PaymentChannels.open",
        opened_erc20,
        f"payer's first channel, {FEE_BPS} bps fee",
    )
    row(
        "Channels: top up (native coin)",
        "PaymentChannels.topUp",
        await mp["buyer"].channels.top_up(opened.channel_id, DEPOSIT),
    )

    domain = (await mp["buyer"].channels.domain()).voucher_domain()
    key = bytes(accounts["buyer"].key)
    for n, (label, notes) in enumerate(
        (
            ("first", "claimed 0 -> non-zero; pays payee and operator"),
            ("subsequent", "claimed already non-zero"),
        ),
        start=1,
    ):
        voucher = sign_voucher(key, domain, opened.channel_id, addr["operator"], 100 * n * PRICE)
        claim = await mp["operator"].channels.claim(
            opened.channel_id, voucher.lane, voucher.cumulative_amount, voucher.signature
        )
        row(
            f"Channels: claim a voucher ({label})",
            "PaymentChannels.claim",
            claim,
            notes + " (native coin, the operator's own lane)",
        )
    # A lane of a registered broker: one more external call (Brokers.brokerOperator).
    lane = test_account("gas-table-broker-lane").address  # TEST ONLY: never sends anything
    await mp["operator"].brokers.register_broker(lane, "mqtt://lane.example:1883")
    for n, (label, notes) in enumerate(
        (
            ("first", "lane claimed 0 -> non-zero; Brokers lookup"),
            ("subsequent", "lane claimed already non-zero; Brokers lookup"),
        ),
        start=1,
    ):
        voucher = sign_voucher(key, domain, opened.channel_id, lane, 10 * n * PRICE)
        claim = await mp["operator"].channels.claim(
            opened.channel_id, lane, voucher.cumulative_amount, voucher.signature
        )
        row(
            f"Channels: claim a voucher on a broker's lane ({label})",
            "PaymentChannels.claim",
            claim,
            notes + " (native coin)",
        )

    row(
        "Channels: request close",
        "PaymentChannels.requestClose",
        await mp["buyer"].channels.request_close(opened.channel_id),
        "payer",
    )
    latest = await w3.eth.get_block("latest")
    tester.time_travel(int(latest["timestamp"]) + CHALLENGE_PERIOD + 1)
    tester.mine_blocks(1)
    row(
        "Channels: withdraw after the challenge period",
        "PaymentChannels.withdraw",
        await mp["buyer"].channels.withdraw(opened.channel_id),
        "refund to payer (native coin)",
    )

    final = sign_voucher(
        bytes(accounts["buyer2"].key), domain, opened_erc20.channel_id, addr["operator"], 50 * PRICE
    )
    row(
        "Channels: cooperative close",
        "PaymentChannels.cooperativeClose",
        await mp["seller"].channels.cooperative_close(
            opened_erc20.channel_id, final.lane, final.cumulative_amount, final.signature
        ),
        "payee; claims a final voucher then refunds (ERC-20)",
    )

    for batch_id, label in ((1, "first"), (2, "subsequent")):
        tree = MerkleTree([leaf_hash(f"batch {batch_id} message {i}".encode()) for i in range(64)])
        row(
            f"Anchors: anchor a batch root ({label})",
            "DataAnchors.anchor",
            await mp["operator"].anchors.anchor(batch_id, tree.root, len(tree)),
            "operator's first anchor" if batch_id == 1 else "latestBatchId already non-zero",
        )

    await _broker_rows(mp, addr, row)

    row(
        "Ratings: rate the other party",
        "Ratings.rate",
        await mp["buyer"].ratings.rate(opened.channel_id, 5),
        "ratee's first rating",
    )
    return rows


async def _broker_rows(mp: dict[str, Marketplace], addr: dict[str, str], row: Any) -> None:
    """The Brokers contract: an operator's broker registrations, a seller's operator choice."""
    endpoints = "mqtt://b1.example:1883 mqtts://b1.example:8883 wss://b1.example/mqtt"
    key, key2 = test_account("gas-broker-1").address, test_account("gas-broker-2").address
    brokers = mp["operator"].brokers
    row(
        "Brokers: register a broker",
        "Brokers.registerBroker",
        await brokers.register_broker(key, endpoints),
        f"operator's first broker, {len(endpoints)}-byte endpoint list",
    )
    row(
        "Brokers: register another broker",
        "Brokers.registerBroker",
        await brokers.register_broker(key2, endpoints.replace("b1", "b2")),
        "operator's list already non-empty",
    )
    row(
        "Brokers: update a broker's endpoints",
        "Brokers.updateEndpoints",
        await brokers.update_endpoints(key, endpoints.replace("b1", "c1")),
        "same length",
    )
    row("Brokers: retire a broker", "Brokers.retireBroker", await brokers.retire_broker(key2))
    row(
        "Brokers: set a seller's default operators",
        "Brokers.setSellerOperators",
        await mp["seller"].brokers.set_seller_operators([addr["operator"]]),
        "one operator",
    )
    row(
        "Brokers: set a topic's operators",
        "Brokers.setTopicOperators",
        await mp["seller"].brokers.set_topic_operators(Market.topic_id(TOPIC), [addr["operator"]]),
        "one operator",
    )


async def _deploy_token(w3: Any, owner: Any) -> Any:
    """The TEST-ONLY mintable ERC-20, for the ERC-20 rows."""
    artifact = load_artifact("BlendsmTestToken")
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = await Transactor(w3, owner).send(factory.constructor())
    return w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])


def render(rows: list[Row]) -> str:
    manifest = load_manifest()
    settings = manifest["settings"]
    optimizer = settings["optimizer"]
    lines = [
        "# Gas per operation",
        "",
        "Generated by `python benchmarks/gas_table.py`; do not edit by hand.",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).date().isoformat()}",
        f"- Compiler: solc {manifest['compilerVersion']}",
        f"- EVM version: {settings['evmVersion']}",
        f"- Optimizer: {'enabled' if optimizer.get('enabled') else 'disabled'}, runs {optimizer.get('runs')}",
        f"- Chain: embedded (eth-tester {version('eth-tester')}, py-evm {version('py-evm')})",
        "- Gas: the receipt's `gasUsed` for the whole transaction (21,000 base and calldata included).",
        "",
        "| Operation | Call | Gas used | Notes |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {r.operation} | `{r.call}` | {r.gas:,} | {r.notes} |" for r in rows]
    lines += [
        "",
        "Storage writes dominate: a slot going from zero to non-zero costs about 20k gas, a later",
        "rewrite of a non-zero slot about 3k, which is why first claims and anchors cost more than",
        "later ones. A broker anchors one root per batch, not per message, and claims vouchers",
        "periodically, not per delivery.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}"
    )
    args = parser.parse_args()
    text = render(asyncio.run(measure()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
