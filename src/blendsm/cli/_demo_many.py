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
from pathlib import Path
from typing import IO, Any

from blendsm.cli._demo_brokers import BrokerProcess
from blendsm.cli._demo_many_parts import (
    BUYERS,
    CREDIT,
    DEPOSIT,
    DEVICES,
    FAILOVER_BOUND,
    LABELS,
    OPERATORS,
    PAY_EVERY,
    RATE_HZ,
    SETTLE_SECONDS,
    TOPICS,
    ManyRun,
    Tape,
    Timeline,
    lost,
)
from blendsm.cli._demo_many_report import many_report
from blendsm.cli._demo_parts import CHALLENGE_PERIOD, FEE_BPS, Progress, until
from blendsm.cli._demo_report import DemoReport

__all__ = ["run_many_brokers_demo"]


async def run_many_brokers_demo(
    brokers: int = 3,
    duration: float = 12.0,
    *,
    chain_url: str | None = None,
    progress: IO[str] | None = None,
    quiet: bool = False,
) -> DemoReport:
    """Run the many-broker scenario (see the module doc) with ``brokers`` processes (2 to
    :data:`MAX_BROKERS`) streaming for ``duration`` seconds; the report. ``chain_url``: a
    development node to use instead of the demo's own (anvil: it must answer
    ``anvil_setBalance``, ``evm_increaseTime`` and ``evm_mine``; a fresh suite is deployed)."""
    import sys

    view = Progress(progress or sys.stderr, quiet=quiet)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blendsm-demo-brokers-") as tmp:
        run = ManyRun(Path(tmp), view)
        try:
            await _set_up_chain(run, chain_url)
            await _start_brokers(run, brokers)
            await _connect_buyers(run)
            await _connect_devices(run)
            timeline = await _stream_kill_restart(run, duration)
            return await _settle_and_report(run, timeline, duration=duration, started=started)
        finally:
            await _close(run)


# --- chain and brokers -----------------------------------------------------------------------


async def _set_up_chain(run: ManyRun, chain_url: str | None) -> None:
    """The chain (the demo's own development node, or ``chain_url``), the suite deployed,
    two operators, a seller with two devices and two topics served by both, four buyers."""
    from blendsm.contracts import (
        Marketplace,
        Policy,
        Role,
        connect,
        deploy_suite,
        enrol_operator,
        start_dev_node,
        test_account,
    )

    path = run.tmp / "deployment.json"
    devices = {d: test_account(f"demo-brokers:{d}") for d in DEVICES}  # TEST ONLY
    if chain_url is None:
        run.view.say("serving a development chain over JSON-RPC (TEST-ONLY accounts)")
        node = run.node = await start_dev_node(
            "127.0.0.1", 0, labels=LABELS, challenge_period=CHALLENGE_PERIOD, deployment_path=path
        )
        assert node.deployment is not None  # deploy=True
        run.url, run.deployment, w3 = node.url, node.deployment, connect(node.url)
        run.accounts = {**node.accounts, **devices}
    else:
        run.view.say(f"deploying the suite on {chain_url} (TEST-ONLY accounts)")
        run.url, w3 = chain_url, connect(chain_url)
        run.accounts = {**{x: test_account(f"demo-brokers:{x}") for x in LABELS}, **devices}
        for label in LABELS:
            address = run.accounts[label].address
            await w3.provider.make_request("anvil_setBalance", [address, hex(10**23)])
        run.deployment = await deploy_suite(
            w3, run.accounts["oracle"], challenge_period=CHALLENGE_PERIOD
        )
        run.deployment.save(path)
        await enrol_operator(w3, run.deployment, run.accounts["operator"], run.accounts["oracle"])
    run.w3, accounts = w3, run.accounts
    run.mps = {label: Marketplace(w3, run.deployment, accounts[label]) for label in LABELS}
    mps, oracle = run.mps, accounts["oracle"]
    await enrol_operator(w3, run.deployment, accounts["operator-b"], oracle)
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


async def _start_brokers(run: ManyRun, count: int) -> None:
    from blendsm.contracts import free_port, test_account

    accounts = run.accounts
    for index in range(count):
        operator = OPERATORS[index % 2]
        name = f"{'AB'[index % 2]}{index // 2 + 1}"
        own = test_account(f"demo-broker:{name}")  # TEST ONLY: the broker's own key (lane)
        broker = BrokerProcess(
            name, operator, free_port(), run.tmp / name, accounts[operator].key.hex(), own.key.hex()
        )
        broker.write_config(
            run.url,
            run.tmp / "deployment.json",
            {
                "payments": {
                    "credit_messages": CREDIT,
                    "settlement": {"interval_seconds": SETTLE_SECONDS},
                },
                "anchoring": {"batch_seconds": 1.0, "max_roots_per_hour": 3600},
            },
        )
        await run.mps[operator].brokers.register_broker(
            own.address, f"mqtt://127.0.0.1:{broker.port}"
        )
        broker.lane = own.address
        run.brokers.append(broker)
        run.by_port[broker.port] = name
    run.view.say(
        f"starting {count} broker processes: "
        + ", ".join(f"{b.name} (operator {'AB'[OPERATORS.index(b.operator)]})" for b in run.brokers)
    )
    await asyncio.gather(*(asyncio.to_thread(b.start) for b in run.brokers))


# --- buyers and devices ----------------------------------------------------------------------


def _order(endpoints: Sequence[Any], names: dict[int, str], first: str) -> list[Any]:
    """The buyer's failover order: ``first``, then the others in the chain's order (brokers
    of one operator meter a shared channel on their own lanes, so any order is safe)."""
    return sorted(endpoints, key=lambda e: names[e.port] != first)


async def _connect_buyers(run: ManyRun) -> None:
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
    endpoints = await asyncio.to_thread(serving_endpoints, run.url, path, topic_id)
    names = run.by_port
    firsts = [b.name for b in run.brokers]
    reader = Web3ChainReader(run.url, path)
    for number, buyer in enumerate(BUYERS):
        first = firsts[0] if number < 2 else firsts[(number - 1) % len(firsts)]
        tape = run.tapes[buyer] = Tape()
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


def _attach(sub: Any, tape: Tape, names: dict[int, str]) -> None:
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


async def _connect_devices(run: ManyRun) -> None:
    from blendsm.device_sdk import MultiHomedPublisher, serving_endpoints

    path = run.tmp / "deployment.json"
    topic_id = next(iter(run.topic_ids.values()))
    endpoints = await asyncio.to_thread(serving_endpoints, run.url, path, topic_id)
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


async def _stream_kill_restart(run: ManyRun, duration: float) -> Timeline:
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
    await until(lambda: not any(lost(run, b) for b in BUYERS), 20, 0.1)
    return Timeline(victim_name, moved, rejoined)


async def _rejoined(run: ManyRun, port: int, since: float) -> float | None:
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


# --- settle, close, report -------------------------------------------------------------------


def _members(run: ManyRun, buyer: str, operator: str) -> list[Any]:
    """The buyer's member Subscribers on brokers of ``operator`` (each pays on its channel)."""
    sub, address = run.subs[buyer], run.accounts[operator].address
    found = [sub.member(e) for e in sub.endpoints if e.broker == address]
    return [m for m in found if m is not None]


async def _settle_and_report(
    run: ManyRun, timeline: Timeline, *, duration: float, started: float
) -> DemoReport:
    run.view.say("paying what is outstanding; the brokers claim on chain")
    for buyer in BUYERS:
        for operator in OPERATORS:
            for member in _members(run, buyer, operator):
                await asyncio.to_thread(member.pay_outstanding)
    # The killed broker may have died before storing the last vouchers sent to it: the
    # buyers that left it send them again now that it is back, so it can claim them.
    owing = await asyncio.gather(*(asyncio.to_thread(run.subs[b].settle_up) for b in BUYERS))
    run.owed_after_settle_up = sum(owing)
    if any(owing):
        run.view.say(f"{sum(owing)} brokers still hold unconfirmed vouchers after settling up")
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
    return many_report(run, timeline, rows, duration=duration, started=started)


async def _close_channels(run: ManyRun, rows: list[dict[str, Any]]) -> None:
    """Every buyer closes both channels; the clock jumps past the challenge period; they
    withdraw the rest. Adds payout, fee and refund to each row."""
    run.view.say("closing the channels and withdrawing the rest after the challenge period")
    for buyer, operator in run.channels:
        await run.mps[buyer].channels.request_close(run.channels[buyer, operator])
    await run.w3.provider.make_request("evm_increaseTime", [CHALLENGE_PERIOD + 1])
    await run.w3.provider.make_request("evm_mine", [])
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
        names = {b.lane: b.name for b in run.brokers}
        row["lanes_claimed"] = sorted({names.get(str(a["lane"]), str(a["lane"])) for a in mine})


async def _close(run: ManyRun) -> None:
    """Disconnect the clients, stop the brokers (SIGTERM), close the chain connection, stop
    the chain node."""
    from blendsm.contracts import disconnect

    for sub in run.subs.values():
        await asyncio.to_thread(sub.disconnect)
    for pub in run.devices.values():
        await asyncio.to_thread(pub.close)
    await asyncio.gather(*(asyncio.to_thread(b.stop) for b in run.brokers))
    if run.w3 is not None:
        await disconnect(run.w3)
    if run.node is not None:
        await run.node.stop()
