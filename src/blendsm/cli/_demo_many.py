"""``blendsm demo --brokers N``: one marketplace served by N broker processes of two operators;
one broker is killed mid-stream and the buyers move.

Everything still runs on this machine with nothing installed beyond the package: the demo
serves its own development chain over JSON-RPC (:func:`~blendsm.contracts.start_dev_node`, the
embedded EVM) and starts N real ``blendsm broker`` processes on it, so the broker killed
dies by SIGKILL, as a crashed process or machine does. The scenario:

* operators ``A`` and ``B`` register their brokers in the ``Brokers`` contract (``A1``, ``B1``,
  ``A2``... alternately) and the seller lets both serve its topics;
* two devices are multi-homed (:class:`~blendsm.device_sdk.MultiHomedPublisher`): every signed
  reading goes to every broker, each with its own durable outbox;
* four buyers hold a funded channel with each operator (opened before the stream: no
  transaction at failover) and run a :class:`~blendsm.device_sdk.FailoverSubscriber` over the
  brokers serving the topics (discovered from the chain), starting on different brokers;
* mid-stream the busiest broker is SIGKILLed: its buyers resume on another broker and ask it
  for what they missed (its replay ring), de-duplicating by (device, topic, sequence); later
  the killed broker is started again from its data directory and rejoins (the devices'
  outboxes to it catch up, it claims the vouchers it had stored);
* at the end every buyer pays what is outstanding, the brokers claim, the channels close and
  the buyers withdraw the rest.

The summary gives the failover time of each buyer that moved and checks, per operator and in
total: no sequence lost after de-duplication, value received == vouchered == settled on
chain, payout + fee == settled, payout + fee + refund == deposit.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from blendsm.cli._demo_brokers import BrokerProcess
from blendsm.cli._demo_parts import CHALLENGE_PERIOD, FEE_BPS, Progress, until
from blendsm.cli._demo_report import DemoReport

__all__ = ["MAX_BROKERS", "run_many_brokers_demo"]

MAX_BROKERS = 4
"""More broker processes than this on a laptop measure the scheduler, not the product."""
OPERATORS = ("operator", "operator-b")
"""Operator ``A`` (enrolled by the development node) and operator ``B``."""
TOPICS = {"demo/temperature": 1_000, "demo/humidity": 700}
"""Price per message (wei); one device per topic."""
DEVICES = ("device-1", "device-2")
BUYERS = ("buyer-1", "buyer-2", "buyer-3", "buyer-4")
DEPOSIT = 10**17
"""Per channel: each buyer funds one channel with each operator."""
RATE_HZ = 10.0
CREDIT = 50
PAY_EVERY = 5
FAILOVER_BOUND = 5.0
SETTLE_SECONDS = 1.0
"""Each broker claims what it holds this often (what the end of the demo waits for)."""
LABELS = ("oracle", *OPERATORS, "seller", *BUYERS)
"""The accounts the chain funds (devices never send a transaction)."""


@dataclass
class _Tape:
    """What one buyer's FailoverSubscriber reported (its callbacks run on paho threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    by_broker: dict[str, int] = field(default_factory=dict)
    failovers: list[tuple[float, Any]] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)
    unverified: int = 0


@dataclass
class _Run:
    """The demo's parties and state (closed in :func:`_close`)."""

    tmp: Path
    view: Progress
    node: Any = None
    w3: Any = None
    deployment: Any = None
    mps: dict[str, Any] = field(default_factory=dict)
    topic_ids: dict[str, bytes] = field(default_factory=dict)
    brokers: list[BrokerProcess] = field(default_factory=list)
    channels: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(buyer, operator label) -> channel id."""
    subs: dict[str, Any] = field(default_factory=dict)
    tapes: dict[str, _Tape] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    published: dict[str, list[int]] = field(default_factory=dict)
    by_port: dict[int, str] = field(default_factory=dict)
    accounts: dict[str, Any] = field(default_factory=dict)
    """Every party's TEST-ONLY account by label."""


async def run_many_brokers_demo(
    brokers: int = 3,
    duration: float = 12.0,
    *,
    progress: IO[str] | None = None,
    quiet: bool = False,
) -> DemoReport:
    """Run the many-broker scenario (see the module doc) with ``brokers`` processes (2 to
    :data:`MAX_BROKERS`) streaming for ``duration`` seconds; the report."""
    import sys

    view = Progress(progress or sys.stderr, quiet=quiet)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blendsm-demo-brokers-") as tmp:
        run = _Run(Path(tmp), view)
        try:
            await _set_up_chain(run)
            await _start_brokers(run, brokers)
            await _connect_buyers(run)
            await _connect_devices(run)
            timeline = await _stream_kill_restart(run, duration)
            return await _settle_and_report(run, timeline, duration=duration, started=started)
        finally:
            await _close(run)


# --- chain and brokers -----------------------------------------------------------------------


async def _set_up_chain(run: _Run) -> None:
    from blendsm.contracts import (
        Marketplace,
        Policy,
        Role,
        connect,
        enrol_operator,
        start_dev_node,
        test_account,
    )

    run.view.say("serving a development chain over JSON-RPC (TEST-ONLY accounts)")
    path = run.tmp / "deployment.json"
    node = run.node = await start_dev_node(
        "127.0.0.1", 0, labels=LABELS, challenge_period=CHALLENGE_PERIOD, deployment_path=path
    )
    assert node.deployment is not None  # deploy=True
    run.deployment = node.deployment
    w3 = run.w3 = connect(node.url)
    accounts = run.accounts = {
        **node.accounts,
        **{d: test_account(f"demo-brokers:{d}") for d in DEVICES},  # TEST ONLY
    }
    run.mps = {label: Marketplace(w3, node.deployment, accounts[label]) for label in LABELS}
    mps, oracle = run.mps, accounts["oracle"]
    await enrol_operator(w3, node.deployment, accounts["operator-b"], oracle)
    for label, role in (("seller", Role.SELLER), *((b, Role.BUYER) for b in BUYERS)):
        await mps[label].registry.apply_for_role(role)
        await mps["oracle"].registry.approve(accounts[label].address)
    for device in DEVICES:
        await mps["seller"].registry.add_device(accounts[device].address)
    for topic, price in TOPICS.items():
        created = await mps["seller"].market.create_topic(topic, price, None, Policy.OPEN)
        run.topic_ids[topic] = created.topic_id
    await mps["seller"].brokers.set_seller_operators([accounts[o].address for o in OPERATORS])
    run.view.say("two operators enrolled; the seller lets both serve its two topics")


async def _start_brokers(run: _Run, count: int) -> None:
    from blendsm.contracts import free_port, test_account

    accounts = run.accounts
    for index in range(count):
        operator = OPERATORS[index % 2]
        name = f"{'AB'[index % 2]}{index // 2 + 1}"
        broker = BrokerProcess(
            name, operator, free_port(), run.tmp / name, accounts[operator].key.hex()
        )
        broker.write_config(
            run.node.url,
            run.tmp / "deployment.json",
            {
                "payments": {
                    "credit_messages": CREDIT,
                    "settlement": {"interval_seconds": SETTLE_SECONDS},
                },
                "anchoring": {"batch_seconds": 1.0},
            },
        )
        key = test_account(f"demo-broker:{name}").address  # TEST ONLY: the broker's own key
        await run.mps[operator].brokers.register_broker(key, f"mqtt://127.0.0.1:{broker.port}")
        run.brokers.append(broker)
        run.by_port[broker.port] = name
    run.view.say(
        f"starting {count} broker processes: "
        + ", ".join(f"{b.name} (operator {'AB'[OPERATORS.index(b.operator)]})" for b in run.brokers)
    )
    await asyncio.gather(*(asyncio.to_thread(b.start) for b in run.brokers))


# --- buyers and devices ----------------------------------------------------------------------


def _order(endpoints: Sequence[Any], names: dict[int, str], first: str) -> list[Any]:
    """The buyer's failover order: ``first``, then the others in the chain's order. Without
    lanes a channel must not be metered by two brokers, so at most one broker per operator."""
    ordered = sorted(endpoints, key=lambda e: names[e.port] != first)
    chosen: list[Any] = []
    for endpoint in ordered:
        if all(e.broker != endpoint.broker for e in chosen):
            chosen.append(endpoint)
    return chosen


async def _connect_buyers(run: _Run) -> None:
    from blendsm.device_sdk import FailoverSubscriber, Web3ChainReader, serving_endpoints

    accounts, deployment = run.accounts, run.deployment
    for buyer in BUYERS:
        for operator in OPERATORS:
            opened = await run.mps[buyer].channels.open(
                accounts["seller"].address, accounts[operator].address, None, DEPOSIT, FEE_BPS
            )
            run.channels[buyer, operator] = opened.channel_id
    path = run.tmp / "deployment.json"
    topic_id = next(iter(run.topic_ids.values()))
    endpoints = await asyncio.to_thread(serving_endpoints, run.node.url, path, topic_id)
    names = run.by_port
    firsts = [b.name for b in run.brokers]
    reader = Web3ChainReader(run.node.url, path)
    for number, buyer in enumerate(BUYERS):
        first = firsts[0] if number < 2 else firsts[(number - 1) % len(firsts)]
        tape = run.tapes[buyer] = _Tape()
        sub = FailoverSubscriber(
            accounts[buyer],
            _order(endpoints, names, first),
            channels_contract=deployment.address("PaymentChannels"),
            connect_timeout=1.0,
            pay_every=PAY_EVERY,
            registry=deployment.address("Registry"),
            chain_reader=reader,
        )
        _attach(sub, tape, names)
        await asyncio.to_thread(sub.connect, 20)
        for topic in TOPICS:
            await asyncio.to_thread(sub.subscribe, topic, 1)
        run.subs[buyer] = sub
    run.view.say(
        "four buyers, each with a channel to both operators, subscribed: "
        + ", ".join(f"{b} on {names[run.subs[b].active.port]}" for b in BUYERS)
    )


def _attach(sub: Any, tape: _Tape, names: dict[int, str]) -> None:
    def message(_s: Any, m: Any, broker: Any) -> None:
        with tape.lock:
            if m.verified is not True:
                tape.unverified += 1
            if m.device is not None and m.sequence is not None:
                tape.seen.add((m.device.lower(), m.topic, m.sequence))
            name = names.get(broker.port, "?")
            tape.by_broker[name] = tape.by_broker.get(name, 0) + 1

    def failover(_s: Any, event: Any) -> None:
        with tape.lock:
            tape.failovers.append((time.monotonic(), event))

    def gap(_s: Any, event: Any) -> None:
        with tape.lock:
            tape.gaps.append(event)

    sub.on_message, sub.on_failover, sub.on_gap = message, failover, gap


async def _connect_devices(run: _Run) -> None:
    from blendsm.device_sdk import MultiHomedPublisher, serving_endpoints

    path = run.tmp / "deployment.json"
    topic_id = next(iter(run.topic_ids.values()))
    endpoints = await asyncio.to_thread(serving_endpoints, run.node.url, path, topic_id)
    for device in DEVICES:
        pub = MultiHomedPublisher(
            run.accounts[device],
            registry=run.deployment.address("Registry"),
            state_dir=run.tmp / device,
            endpoints=endpoints,
        )
        await asyncio.to_thread(pub.connect, 20)
        run.devices[device] = pub
        run.published[device] = []
    run.view.say(f"two devices multi-homed to all {len(endpoints)} brokers")


# --- the stream, the kill, the restart -------------------------------------------------------


@dataclass
class _Timeline:
    killed: str
    moved: dict[str, float]
    """Buyers that were on the killed broker -> seconds from the SIGKILL to resumed."""
    rejoined_seconds: float | None
    """From the restart command to the devices' outboxes to it being empty again."""


async def _stream_kill_restart(run: _Run, duration: float) -> _Timeline:
    """Stream for ``duration`` s; SIGKILL the busiest broker at 40 % of it, start it again at
    70 %; then wait until every buyer holds every sequence published (bounded)."""
    stop = threading.Event()

    def stream(device: str, topic: str) -> None:
        pub, sent = run.devices[device], run.published[device]
        while not stop.wait(1.0 / RATE_HZ):
            sent.append(pub.publish(topic, b"reading %d" % len(sent)))

    threads = [
        threading.Thread(target=stream, args=(d, t), daemon=True, name=f"demo-{d}")
        for d, t in zip(DEVICES, TOPICS, strict=True)
    ]
    for thread in threads:
        thread.start()
    run.view.say(f"streaming at {RATE_HZ:g} readings/s per device for {duration:g} s")
    try:
        await asyncio.sleep(duration * 0.4)
        on: dict[str, str] = {}
        for buyer, sub in run.subs.items():
            active = sub.active
            on[buyer] = run.by_port.get(active.port, "?") if active is not None else "?"
        victim_name = max(run.by_port.values(), key=lambda n: list(on.values()).count(n))
        victim = next(b for b in run.brokers if b.name == victim_name)
        moving = [b for b, name in on.items() if name == victim_name]
        before = {b: len(run.tapes[b].failovers) for b in moving}
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        run.view.say(f"SIGKILL broker {victim_name} ({', '.join(moving)} on it)")
        await until(
            lambda: all(len(run.tapes[b].failovers) > before[b] for b in moving),
            FAILOVER_BOUND + 10,
            0.05,
        )
        moved: dict[str, float] = {}
        for buyer in moving:
            tape = run.tapes[buyer]
            with tape.lock:
                done = [(at, e) for at, e in tape.failovers[before[buyer] :] if e.to is not None]
            if done:
                at, event = done[0]
                moved[buyer] = round(at - killed_at, 2)
                run.view.say(
                    f"{buyer} resumed on {run.by_port.get(event.to.port, '?')}"
                    f" {at - killed_at:.2f} s after the kill"
                )
        await asyncio.sleep(max(0.0, killed_at + duration * 0.3 - time.monotonic()))
        restarted_at = time.monotonic()
        await asyncio.to_thread(victim.start)
        run.view.say(f"broker {victim_name} started again from its data directory")
        await asyncio.sleep(max(0.0, duration * 0.3 - (time.monotonic() - restarted_at)))
    finally:
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 5)
    rejoined = await _rejoined(run, victim.port, restarted_at)
    total = sum(len(s) for s in run.published.values())
    run.view.say(f"stream stopped: {total} readings published; waiting for the buyers to hold all")
    await until(lambda: not any(_lost(run, b) for b in BUYERS), 20, 0.1)
    return _Timeline(victim_name, moved, rejoined)


async def _rejoined(run: _Run, port: int, since: float) -> float | None:
    """Seconds from the restart until every device's outbox to the restarted broker is empty
    (it has every reading again); None if not within 20 s."""

    def caught_up() -> bool:
        return all(
            leg.connected and leg.pending == 0
            for pub in run.devices.values()
            for leg in pub.legs
            if leg.endpoint.port == port
        )

    if await until(caught_up, 20, 0.1):
        return round(time.monotonic() - since, 2)
    return None


def _lost(run: _Run, buyer: str) -> int:
    """Sequences published that ``buyer`` has not received (after de-duplication)."""
    tape = run.tapes[buyer]
    with tape.lock:
        seen = set(tape.seen)
    lost = 0
    for device, topic in zip(DEVICES, TOPICS, strict=True):
        address = run.accounts[device].address.lower()
        lost += sum((address, topic, s) not in seen for s in run.published[device])
    return lost


# --- settle, close, report -------------------------------------------------------------------


def _settle_up(run: _Run, buyer: str) -> int:
    """Reconnect the buyer's members on brokers it left whose last voucher was never
    confirmed (the broker died before storing it): on connect a member sends its latest
    voucher again, and the broker, back from its data directory, stores and claims it.
    Returns how many members had to."""
    sub = run.subs[buyer]
    count = 0
    for endpoint in sub.endpoints:
        member = sub.member(endpoint)
        if member is None or endpoint == sub.active:
            continue
        owed = [
            (ch, member.vouchered(ch))
            for (b, _), ch in run.channels.items()
            if b == buyer and member.vouchered(ch) > member.confirmed(ch)
        ]
        if not owed:
            continue
        count += 1
        try:
            member.connect(10)
            for ch, amount in owed:
                member.wait_confirmed(ch, amount, 10)
        except Exception as exc:  # reported by the invariants below
            run.view.say(f"{buyer}: could not settle up with {endpoint.port}: {exc!r}")
        finally:
            member.halt()
    return count


def _members(run: _Run, buyer: str, operator: str) -> list[Any]:
    """The buyer's member Subscribers on brokers of ``operator`` (each pays on its channel)."""
    sub, address = run.subs[buyer], run.accounts[operator].address
    found = [sub.member(e) for e in sub.endpoints if e.broker == address]
    return [m for m in found if m is not None]


async def _settle_and_report(
    run: _Run, timeline: _Timeline, *, duration: float, started: float
) -> DemoReport:
    run.view.say("paying what is outstanding; the brokers claim on chain")
    for buyer in BUYERS:
        for operator in OPERATORS:
            for member in _members(run, buyer, operator):
                await asyncio.to_thread(member.pay_outstanding)
    settled_up = await asyncio.gather(*(asyncio.to_thread(_settle_up, run, b) for b in BUYERS))
    if any(settled_up):
        run.view.say(
            f"{sum(settled_up)} vouchers re-sent to the restarted broker (it died before storing"
            " them)"
        )
    channels = run.mps["seller"].channels

    def vouchered(buyer: str, operator: str) -> int:
        ch = run.channels[buyer, operator]
        return sum(m.vouchered(ch) for m in _members(run, buyer, operator))

    killed_port = next(b.port for b in run.brokers if b.name == timeline.killed)

    def on_killed(buyer: str, operator: str) -> bool:
        return any(m.port == killed_port for m in _members(run, buyer, operator))

    async def claimed_all(strict: bool) -> bool:
        """Every channel claimed up to its vouchers (``strict``: also those the killed
        broker served, which may stay short by what it lost count of)."""
        for (buyer, operator), ch in run.channels.items():
            if not strict and on_killed(buyer, operator):
                continue
            info = await channels.channel(ch)
            if info is None or info.claimed != vouchered(buyer, operator):
                return False
        return True

    for strict, seconds in ((False, 30.0), (True, 4 * SETTLE_SECONDS)):
        for _ in range(int(seconds / 0.2)):
            if await claimed_all(strict):
                break
            await asyncio.sleep(0.2)
    rows = []
    for (buyer, operator), ch in run.channels.items():
        info = await channels.channel(ch)
        members = _members(run, buyer, operator)
        rows.append(
            {
                "buyer": buyer,
                "operator": "AB"[OPERATORS.index(operator)],
                "on_killed_broker": any(m.port == killed_port for m in members),
                "channel": "0x" + ch.hex(),
                "received_value": sum(m.received_value(ch) for m in members),
                "vouchered": vouchered(buyer, operator),
                "settled_onchain": info.claimed if info is not None else -1,
            }
        )
    await _close_channels(run, rows)
    return _report(run, timeline, rows, duration=duration, started=started)


async def _close_channels(run: _Run, rows: list[dict[str, Any]]) -> None:
    """Every buyer closes both channels; the clock jumps past the challenge period; they
    withdraw the rest. Adds payout, fee and refund to each row."""
    run.view.say("closing the channels and withdrawing the rest after the challenge period")
    for buyer, operator in run.channels:
        await run.mps[buyer].channels.request_close(run.channels[buyer, operator])
    run.node.rpc.call("evm_increaseTime", [CHALLENGE_PERIOD + 1])
    run.node.rpc.call("evm_mine", [])
    refunds = {}
    for buyer, operator in run.channels:
        settled = await run.mps[buyer].channels.withdraw(run.channels[buyer, operator])
        refunds[run.channels[buyer, operator]] = settled.refund
    contract = run.mps["seller"].channels.contract
    logs = await contract.events.ChannelClaimed().get_logs(from_block=run.deployment.block)
    for row in rows:
        ch = bytes.fromhex(row["channel"][2:])
        mine = [e["args"] for e in logs if bytes(e["args"]["channelId"]) == ch]
        row["fee_to_operator"] = sum(int(a["fee"]) for a in mine)
        row["payout_to_seller"] = sum(int(a["payout"]) - int(a["fee"]) for a in mine)
        row["refund"] = refunds[ch]
        row["deposit"] = DEPOSIT


def _report(
    run: _Run, timeline: _Timeline, rows: list[dict[str, Any]], *, duration: float, started: float
) -> DemoReport:
    problems: list[str] = []
    lost = {b: _lost(run, b) for b in BUYERS}
    gaps = {b: len(run.tapes[b].gaps) for b in BUYERS}
    unverified = sum(t.unverified for t in run.tapes.values())
    slowest = max(timeline.moved.values(), default=None)
    if not timeline.moved:
        problems.append(f"no buyer moved off the killed broker {timeline.killed}")
    elif slowest is not None and slowest > FAILOVER_BOUND:
        problems.append(f"a buyer took {slowest} s to resume (bound {FAILOVER_BOUND} s)")
    if any(lost.values()):
        problems.append(f"sequences lost after de-duplication: {lost}")
    if unverified:
        problems.append(f"{unverified} messages not verified (signature or device)")
    if timeline.rejoined_seconds is None:
        problems.append(f"broker {timeline.killed} did not catch up after its restart")
    bound = CREDIT * max(TOPICS.values())
    for row in rows:
        name = f"channel of {row['buyer']} with operator {row['operator']}"
        received, vouchered, settled = (
            row["received_value"],
            row["vouchered"],
            row["settled_onchain"],
        )
        # The killed broker never claims deliveries whose count died with it (it cannot show
        # them; the buyer keeps that money): at most what it had not yet written, within the
        # credit. Every other channel: equal.
        slack = bound if row["on_killed_broker"] else 0
        if not (received == vouchered and 0 <= vouchered - settled <= slack):
            problems.append(
                f"{name}: received {received}, vouchered {vouchered}, settled on chain"
                f" {settled} (allowed shortfall {slack})"
            )
        if row["payout_to_seller"] + row["fee_to_operator"] != row["settled_onchain"]:
            problems.append(f"{name}: payout + fee != settled on chain")
        if row["payout_to_seller"] + row["fee_to_operator"] + row["refund"] != DEPOSIT:
            problems.append(f"{name}: payout + fee + refund != deposit")
    per_operator = {}
    for letter in "AB":
        mine = [r for r in rows if r["operator"] == letter]
        per_operator[letter] = {
            k: sum(r[k] for r in mine)
            for k in ("received_value", "vouchered", "settled_onchain", "fee_to_operator")
        }
    if sum(r["settled_onchain"] for r in rows) == 0:
        problems.append("nothing was settled on chain")
    figures: dict[str, Any] = {
        "brokers": [
            {"name": b.name, "operator": "AB"[OPERATORS.index(b.operator)], "starts": b.starts}
            for b in run.brokers
        ],
        "duration_seconds": duration,
        "elapsed_seconds": round(time.monotonic() - started, 2),
        "killed_broker": timeline.killed,
        "failover_seconds": timeline.moved,
        "failover_seconds_max": slowest,
        "rejoined_seconds": timeline.rejoined_seconds,
        "messages_published": sum(len(s) for s in run.published.values()),
        "delivered_per_broker": {b: dict(sorted(run.tapes[b].by_broker.items())) for b in BUYERS},
        "lost_after_dedup": lost,
        "gaps_reported": gaps,
        "duplicates_dropped": {b: run.subs[b].stats.duplicates_dropped for b in BUYERS},
        "replayed": {b: run.subs[b].stats.replayed for b in BUYERS},
        "per_operator": per_operator,
        "amount_settled_onchain": sum(r["settled_onchain"] for r in rows),
        "uncounted_at_kill": sum(r["vouchered"] - r["settled_onchain"] for r in rows),
        "paid_to_seller": sum(r["payout_to_seller"] for r in rows),
        "fees_to_operators": sum(r["fee_to_operator"] for r in rows),
        "refunded_to_buyers": sum(r["refund"] for r in rows),
        "deposits": DEPOSIT * len(rows),
    }
    return DemoReport(figures, rows, problems)


def format_many_summary(report: DemoReport) -> str:
    """The human summary of a many-broker run."""
    f = report.figures
    brokers = ", ".join(f"{b['name']} (operator {b['operator']})" for b in f["brokers"])
    moved = ", ".join(f"{b} {s:.2f} s" for b, s in f["failover_seconds"].items()) or "none"
    lines = [
        f"blendsm demo --brokers {len(f['brokers'])}: {brokers}",
        f"  killed {f['killed_broker']} mid-stream; buyers resumed elsewhere: {moved}"
        f" (bound {FAILOVER_BOUND:g} s); restarted, caught up in {f['rejoined_seconds']} s",
        f"  {f['messages_published']} readings published; lost after de-duplication:"
        f" {sum(f['lost_after_dedup'].values())}; gaps reported: {sum(f['gaps_reported'].values())}",
    ]
    for letter, money in f["per_operator"].items():
        lines.append(
            f"  operator {letter}: received {money['received_value']}, vouchered"
            f" {money['vouchered']}, settled {money['settled_onchain']} wei"
            f" (fees {money['fee_to_operator']})"
        )
    lines.append(
        f"  not claimable after the kill: {f['uncounted_at_kill']} wei (deliveries whose count"
        " died with the killed broker; the buyers keep it)"
    )
    lines.append(
        f"  total: payouts {f['paid_to_seller']} + fees {f['fees_to_operators']} + refunds"
        f" {f['refunded_to_buyers']} = deposits {f['deposits']}"
        f" -> {'invariants hold' if report.ok else 'INVARIANTS BROKEN'}"
    )
    return "\n".join(lines)


async def _close(run: _Run) -> None:
    """Disconnect the clients, stop the brokers (SIGTERM), stop the chain node."""
    for sub in run.subs.values():
        await asyncio.to_thread(sub.disconnect)
    for pub in run.devices.values():
        await asyncio.to_thread(pub.close)
    await asyncio.gather(*(asyncio.to_thread(b.stop) for b in run.brokers))
    if run.node is not None:
        await run.node.stop()
