"""``blendsm demo``: the whole marketplace, embedded, in one command.

An in-process EVM starts with TEST-ONLY accounts (keys derived from labels, holding no
value), the suite is deployed and the broker runs on 127.0.0.1 with every plugin. The
oracle enrols a seller with three devices and two buyers; the seller lists three paid topics,
one marked end-to-end encrypted on chain (its keys served by a ``TopicKeyService``). Each
buyer opens a payment channel with an operator fee, and SDK Subscribers receive, verify
(signature, device, sampled Merkle proofs against the chain) and pay as the devices stream
signed readings. Then: outstanding vouchers are paid, claimed on chain, the last leaves
anchored and proven, both sides rate each other, the channels close, the chain's clock
jumps past the challenge period and the buyers withdraw what is left.

Money and integrity invariants are checked at the end; :func:`run_demo` returns a
:class:`DemoReport` and the command exits 1 if any is broken.

Threading: the in-process EthereumTester is not thread-safe and SDK callbacks run on paho and
worker threads, so the Subscribers read the chain through :class:`LoopChainReader`, which
runs each read on the event loop that owns the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from blendsm.errors import ChainUnavailableError

__all__ = ["DemoReport", "LoopChainReader", "run_demo"]

_T = TypeVar("_T")

PRICES = {"demo/temperature": 1_000, "demo/humidity": 700, "demo/location": 2_500}
"""Price per message (wei) of each paid topic; the last one is end-to-end encrypted."""
ENCRYPTED_TOPIC = "demo/location"
DEVICES = ("device-1", "device-2", "device-3")
"""One device per topic, in the order of PRICES."""
BUYERS = ("buyer-1", "buyer-2")
DEPOSIT = 10**17
FEE_BPS = 150  # 1.5 % of every claim to the broker operator
CHALLENGE_PERIOD = 3600
RATE_HZ = 20.0  # readings per second per device
PROOF_SAMPLING = 0.1
CREDIT_MESSAGES = 100  # unpaid messages the broker lets a channel owe ...
PAY_EVERY = 5  # ... while the SDK pays every 5: vouchers in flight rarely stall delivery


class LoopChainReader:
    """A :class:`~blendsm.device_sdk.ChainReader` that runs every read on ``loop`` through the
    async bindings (``asyncio.run_coroutine_threadsafe``), so threads never touch an
    in-process chain directly. Topic sellers and device owners are cached ``ttl`` seconds,
    anchored roots for good. Never call it from the loop's own thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        marketplace: Any,
        *,
        ttl: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.loop = loop
        self.marketplace = marketplace
        self.ttl = ttl
        self.timeout = timeout
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._roots: dict[tuple[str, int], bytes] = {}
        self.calls = 0

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        self.calls += 1
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except TimeoutError as exc:
            future.cancel()
            raise ChainUnavailableError(
                f"chain read did not finish within {self.timeout:g} s"
            ) from exc

    def _cached(
        self, key: tuple[str, str], read: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]

        async def call() -> str | None:
            return await read()

        value = self._run(call())
        with self._lock:
            self._cache[key] = (now + self.ttl, value)
        return value

    def seller_of_topic(self, topic: str) -> str | None:
        from blendsm.contracts._bindings import Market

        async def read() -> str | None:
            info = await self.marketplace.market.topic(Market.topic_id(topic))
            return None if info is None else str(info.seller)

        return self._cached(("topic", topic), read)

    def active_seller_of(self, device: str) -> str | None:
        async def read() -> str | None:
            seller = await self.marketplace.registry.active_seller_of(device)
            return None if seller is None else str(seller)

        return self._cached(("device", device.lower()), read)

    def anchor_root(self, broker: str, batch_id: int) -> bytes | None:
        key = (broker.lower(), batch_id)
        with self._lock:
            root = self._roots.get(key)
        if root is not None:
            return root

        async def read() -> bytes | None:
            info = await self.marketplace.anchors.anchor_of(broker, batch_id)
            return None if info is None else bytes(info.root)

        got = self._run(read())
        if got is not None:
            with self._lock:
                self._roots[key] = got
        return got


@dataclass
class _Tally:
    """What one buyer's Subscriber saw (callbacks run on SDK threads: under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    paid: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    unverified: int = 0
    decrypted: int = 0
    undecrypted: int = 0
    events: dict[str, int] = field(default_factory=dict)
    errors: int = 0


@dataclass
class DemoReport:
    """Figures of one demo run (amounts in wei, as integers) and the invariants broken."""

    figures: dict[str, Any]
    channels: list[dict[str, Any]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            **self.figures,
            "amount_unit": "wei (integers)",
            "channels": self.channels,
            "invariants_hold": self.ok,
            "problems": self.problems,
        }


class _Progress:
    """One updating line on a TTY, a line every few seconds otherwise."""

    def __init__(self, stream: IO[str], *, quiet: bool = False, every: float = 2.0) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            return
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        """A phase line (ends the live line first on a TTY)."""
        if self.quiet:
            return
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


async def _until(predicate: Callable[[], bool], within: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


async def run_demo(
    duration: float = 10.0,
    *,
    progress: IO[str] | None = None,
    quiet: bool = False,
    rate_hz: float = RATE_HZ,
) -> DemoReport:
    """Run the embedded marketplace for ``duration`` seconds of streaming; the report."""
    with tempfile.TemporaryDirectory(prefix="blendsm-demo-") as tmp:
        return await _run(
            Path(tmp), duration, _Progress(progress or sys.stderr, quiet=quiet), rate_hz
        )


async def _run(tmp: Path, duration: float, view: _Progress, rate_hz: float) -> DemoReport:
    from coincurve import PrivateKey

    from blendsm.broker._config import parse_config
    from blendsm.broker._runner import ChainConnection, _enrol_operator, start_broker
    from blendsm.contracts._bindings import Marketplace, Policy, Role
    from blendsm.contracts._connect import EMBEDDED, connect
    from blendsm.contracts._deploy import deploy_suite
    from blendsm.contracts._devchain import new_embedded_chain, test_account
    from blendsm.device_sdk import Publisher, Subscriber, TopicKeyring, TopicKeyService
    from blendsm.device_sdk._integrity import IntegrityKind

    started = time.monotonic()
    loop = asyncio.get_running_loop()
    labels = ("operator", "oracle", "seller", *BUYERS, *DEVICES)
    accounts = {label: test_account(f"demo:{label}") for label in labels}  # TEST ONLY
    addr = {label: acct.address for label, acct in accounts.items()}
    view.say("starting the in-process chain (TEST-ONLY accounts) and deploying the suite")
    tester = new_embedded_chain(fund=[addr[x] for x in ("operator", "oracle", "seller", *BUYERS)])
    w3 = connect(EMBEDDED, ethereum_tester=tester)
    deployment = await deploy_suite(w3, accounts["oracle"], challenge_period=CHALLENGE_PERIOD)
    await _enrol_operator(w3, deployment, accounts["operator"], accounts["oracle"])
    mps = {label: Marketplace(w3, deployment, accounts[label]) for label in labels}
    reader_mp = Marketplace(w3, deployment)

    view.say("enrolling a seller with three devices and two buyers through the oracle")
    for label, role in (("seller", Role.SELLER), *((b, Role.BUYER) for b in BUYERS)):
        await mps[label].registry.apply_for_role(role)
        await mps["oracle"].registry.approve(addr[label])
    for device in DEVICES:
        await mps["seller"].registry.add_device(addr[device])
    topic_of = dict(zip(DEVICES, PRICES, strict=True))
    topic_ids: dict[str, bytes] = {}
    for topic, price in PRICES.items():
        created = await mps["seller"].market.create_topic(topic, price, None, Policy.OPEN)
        topic_ids[topic] = created.topic_id
    await mps["seller"].market.set_encrypted(topic_ids[ENCRYPTED_TOPIC], True)

    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 0.1},
            "payments": {
                "credit_messages": CREDIT_MESSAGES,
                "settlement": {"interval_seconds": max(2.0, duration / 2)},
            },
            "anchoring": {"batch_seconds": 1.0, "batch_max_leaves": 1000},
            "data_dir": str(tmp / "broker"),
            "log_level": "WARNING",
        }
    )
    chain = ChainConnection(w3, deployment, accounts["operator"], tester)
    running = await start_broker(config, chain=chain)
    service = running.service
    anchorer, settler = service.anchorer, service.settler
    if anchorer is None or settler is None:  # start_broker sets both
        await running.stop()
        raise ChainUnavailableError("the marketplace service did not start")
    view.say(f"broker listening on {running.host}:{running.port} (operator {addr['operator']})")
    common: dict[str, Any] = {
        "host": running.host,
        "port": running.port,
        "broker": addr["operator"],
        "chain_id": deployment.chain_id,
    }
    registry = deployment.address("Registry")
    clients: list[Any] = []
    tallies = {b: _Tally() for b in BUYERS}
    published = dict.fromkeys(DEVICES, 0)
    try:
        # Channels first: the key service recovers buyers' public keys from those txs.
        reader = LoopChainReader(loop, reader_mp)
        subs: dict[str, Subscriber] = {}
        channels: dict[str, bytes] = {}
        for buyer in BUYERS:
            sub = Subscriber(
                accounts[buyer],
                channels_contract=deployment.address("PaymentChannels"),
                pay_every=PAY_EVERY,
                registry=registry,
                chain_reader=reader,
                proof_sampling=PROOF_SAMPLING,
                **common,
            )
            channels[buyer] = await sub.open_channel(
                mps[buyer], addr["seller"], DEPOSIT, fee_bps=FEE_BPS
            )
            subs[buyer] = sub
        view.say(
            f"opened {len(channels)} channels of {DEPOSIT} wei each,"
            f" operator fee {FEE_BPS / 100:g} %"
        )

        keys = TopicKeyService(
            bytes(accounts["seller"].key),
            marketplace=mps["seller"],
            topics=[ENCRYPTED_TOPIC],
            state_dir=tmp / "seller-keys",
            devices={
                addr["device-3"]: PrivateKey(bytes(accounts["device-3"].key)).public_key.format(
                    False
                )
            },
            **common,
        )
        clients.append(keys)
        await asyncio.to_thread(keys.connect)
        keyrings = {
            label: TopicKeyring(
                bytes(accounts[label].key), topics={ENCRYPTED_TOPIC: addr["seller"]}, **common
            )
            for label in ("device-3", *BUYERS)
        }
        for keyring in keyrings.values():
            clients.append(keyring)
            await asyncio.to_thread(keyring.connect)
        granted = await keys.grant_devices()
        for buyer in BUYERS:
            granted += await keys.grant(addr[buyer])
        for label, keyring in keyrings.items():
            if not await asyncio.to_thread(keyring.wait_for_epoch, ENCRYPTED_TOPIC, 1):
                raise ChainUnavailableError(f"{label} got no key for {ENCRYPTED_TOPIC}")
        view.say(f"topic keys of {ENCRYPTED_TOPIC} granted to the device and both buyers")

        for buyer in BUYERS:
            subs[buyer].keyring = keyrings[buyer]
            tally = tallies[buyer]

            def on_message(_s: Any, m: Any, tally: _Tally = tally) -> None:
                with tally.lock:
                    if m.paid:
                        tally.paid[m.topic] = tally.paid.get(m.topic, 0) + 1
                    if m.verified:
                        tally.verified += 1
                    else:
                        tally.unverified += 1
                    if m.decrypted is True:
                        tally.decrypted += 1
                    elif m.encrypted:
                        tally.undecrypted += 1

            def on_integrity(_s: Any, e: Any, tally: _Tally = tally) -> None:
                with tally.lock:
                    tally.events[str(e.kind)] = tally.events.get(str(e.kind), 0) + 1

            def on_error(_s: Any, _e: Any, tally: _Tally = tally) -> None:
                with tally.lock:
                    tally.errors += 1

            subs[buyer].on_message = on_message
            subs[buyer].on_integrity = on_integrity
            subs[buyer].on_error = on_error

        def channels_seen() -> bool:
            return all(service.view.channel(c) is not None for c in channels.values())

        if not await _until(channels_seen, 15):
            raise ChainUnavailableError("the broker's chain view did not see the channels")
        for sub in subs.values():
            clients.append(sub)
            await asyncio.to_thread(sub.connect)
            for topic in PRICES:
                await asyncio.to_thread(sub.subscribe, topic, 0)
        service.meter.credit_messages = CREDIT_MESSAGES

        devices: dict[str, Publisher] = {}
        for device in DEVICES:
            pub = Publisher(
                accounts[device],
                registry=registry,
                state_dir=tmp / device,
                encryptor=keyrings["device-3"].encryptor if device == "device-3" else None,
                **common,
            )
            clients.append(pub)
            await asyncio.to_thread(pub.connect)
            devices[device] = pub

        # ---- stream -----------------------------------------------------------------
        view.say(f"streaming signed readings from {len(DEVICES)} devices for {duration:g} s")
        stop = threading.Event()

        def stream(device: str) -> None:
            pub, topic = devices[device], topic_of[device]
            period = 1.0 / rate_hz
            nxt = time.monotonic()
            i = 0
            while not stop.is_set():
                reading = f'{{"device":"{device}","n":{i},"t":{time.time():.3f}}}'.encode()
                pub.publish(topic, reading, qos=1)
                published[device] += 1
                i += 1
                nxt += period
                stop.wait(max(0.0, nxt - time.monotonic()))

        threads = [threading.Thread(target=stream, args=(d,), daemon=True) for d in DEVICES]
        for t in threads:
            t.start()

        def line() -> str:
            vouchered = sum(subs[b].vouchered(channels[b]) for b in BUYERS)
            proofs = sum(
                t.events.get(str(IntegrityKind.PROOF_VERIFIED), 0) for t in tallies.values()
            )
            return (
                f"  {time.monotonic() - stream_start:5.1f}s  published {sum(published.values())}"
                f"  delivered {service.meter.delivered}  vouchers {service.stats.vouchers_accepted}"
                f" ({vouchered} wei)  anchors {service.stats.anchor_notices}"
                f"  proofs ok {proofs}"
            )

        stream_start = time.monotonic()
        try:
            while time.monotonic() - stream_start < duration:
                view.show(line())
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                await asyncio.to_thread(t.join, 10)
        view.show(line(), force=True)
        for pub in devices.values():
            await asyncio.to_thread(pub.flush, 15)
        total_published = sum(published.values())
        expected = total_published * len(BUYERS)
        await _until(
            lambda: service.meter.delivered + service.meter.denied_no_credit >= expected, 15
        )
        for sub in subs.values():
            await asyncio.to_thread(sub.wait_idle, 15)

        # ---- pay what is outstanding ----------------------------------------------------
        view.say("paying the outstanding vouchers")

        def paid_up() -> bool:
            for sub in subs.values():
                sub.pay_outstanding()
            return all(
                (a := service.meter.accounts.get(channels[b])) is not None
                and a.paid == a.charged == subs[b].vouchered(channels[b])
                for b in BUYERS
            )

        await _until(paid_up, 20, 0.1)

        # ---- anchor and prove -----------------------------------------------------------
        view.say("anchoring the last leaves and checking sampled proofs against the chain")
        await anchorer.anchor_now()
        await _until(lambda: all(s.pending_proofs() == 0 for s in subs.values()), 20, 0.1)
        for sub in subs.values():
            await asyncio.to_thread(sub.wait_idle, 15)

        # ---- settle on chain -------------------------------------------------------------
        view.say("settling the vouchers on chain")
        results = await settler.settle_now()
        claim_failures = [r for r in results if r.status != "confirmed"]

        # ---- rate -------------------------------------------------------------------------
        ratings = 0
        for buyer in BUYERS:
            info = await reader_mp.channels.channel(channels[buyer])
            if info is not None and info.claimed > 0:
                await mps[buyer].ratings.rate(channels[buyer], 5)
                await mps["seller"].ratings.rate(channels[buyer], 4)
                ratings += 2
        seller_rating = await reader_mp.ratings.average_x100(addr["seller"])
        view.say(f"rated both sides of every channel ({ratings} ratings)")

        # ---- close, wait out the challenge period, withdraw ---------------------------------
        view.say("closing the channels and withdrawing the rest after the challenge period")
        stats = {b: subs[b].stats for b in BUYERS}
        vouchered = {b: subs[b].vouchered(channels[b]) for b in BUYERS}
        for buyer, sub in subs.items():
            await sub.close_channel(mps[buyer], channels[buyer])
        latest = await w3.eth.get_block("latest")
        tester.time_travel(int(latest["timestamp"]) + CHALLENGE_PERIOD + 1)
        tester.mine_blocks(1)
        refunds: dict[str, int] = {}
        for buyer, sub in subs.items():
            refunds[buyer] = (await sub.withdraw(mps[buyer], channels[buyer])).refund

        # ---- figures and invariants ---------------------------------------------------------
        claimed_logs = await reader_mp.channels.contract.events.ChannelClaimed().get_logs(
            from_block=deployment.block
        )
        payouts = dict.fromkeys(BUYERS, 0)
        fees = dict.fromkeys(BUYERS, 0)
        by_id = {channels[b]: b for b in BUYERS}
        for event in claimed_logs:
            who = by_id.get(bytes(event["args"]["channelId"]))
            if who is not None:
                fees[who] += int(event["args"]["fee"])
                payouts[who] += int(event["args"]["payout"]) - int(event["args"]["fee"])
        head = int(await w3.eth.block_number)
        gas = 0
        for number in range(deployment.block + 1, head + 1):
            gas += int((await w3.eth.get_block(number))["gasUsed"])
        anchors = await reader_mp.anchors.latest_batch_id(addr["operator"])

        problems: list[str] = []
        per_channel: list[dict[str, Any]] = []
        for buyer in BUYERS:
            ch = channels[buyer]
            account = service.meter.accounts.get(ch)
            tally = tallies[buyer]
            info = await reader_mp.channels.channel(ch)
            delivered_value = sum(PRICES[t] * n for t, n in tally.paid.items())
            delivered_n = sum(tally.paid.values())
            charged = account.charged if account is not None else -1
            broker_delivered = account.delivered if account is not None else -1
            claimed = info.claimed if info is not None else -1
            row = {
                "buyer": addr[buyer],
                "channel": "0x" + ch.hex(),
                "delivered": delivered_n,
                "delivered_value": delivered_value,
                "vouchered": vouchered[buyer],
                "charged": charged,
                "settled_onchain": claimed,
                "payout_to_seller": payouts[buyer],
                "fee_to_operator": fees[buyer],
                "refund": refunds[buyer],
                "deposit": DEPOSIT,
            }
            per_channel.append(row)
            name = f"channel of {buyer}"
            if not delivered_value == vouchered[buyer] == charged == claimed:
                problems.append(
                    f"{name}: delivered x price {delivered_value}, vouchered {vouchered[buyer]},"
                    f" charged {charged}, settled on chain {claimed} differ"
                )
            if broker_delivered != delivered_n or stats[buyer].paid_messages != delivered_n:
                problems.append(
                    f"{name}: broker delivered {broker_delivered}, subscriber paid for"
                    f" {stats[buyer].paid_messages}, counted {delivered_n}"
                )
            if payouts[buyer] + fees[buyer] != claimed:
                problems.append(f"{name}: payout + fee {payouts[buyer] + fees[buyer]} != claimed")
            if payouts[buyer] + fees[buyer] + refunds[buyer] != DEPOSIT:
                problems.append(
                    f"{name}: payout {payouts[buyer]} + fee {fees[buyer]} + refund"
                    f" {refunds[buyer]} != deposit {DEPOSIT}"
                )
            if info is None or not info.settled:
                problems.append(f"{name}: not settled on chain")

        def events(kind: IntegrityKind) -> int:
            return sum(t.events.get(str(kind), 0) for t in tallies.values())

        verified_proofs = events(IntegrityKind.PROOF_VERIFIED)
        failed_proofs = events(IntegrityKind.PROOF_FAILED)
        unavailable_proofs = events(IntegrityKind.PROOF_UNAVAILABLE)
        pending_proofs = sum(s.pending_proofs() for s in subs.values())
        signature_failures = (
            events(IntegrityKind.BAD_SIGNATURE)
            + events(IntegrityKind.UNKNOWN_DEVICE)
            + events(IntegrityKind.BAD_ENVELOPE)
            + sum(t.unverified for t in tallies.values())
            + sum(s.unpaid_invalid for s in stats.values())
        )
        delivered_total = sum(sum(t.paid.values()) for t in tallies.values())
        undecrypted = sum(t.undecrypted for t in tallies.values())
        if delivered_total == 0:
            problems.append("no paid message was delivered")
        if delivered_total != service.meter.delivered:
            problems.append(
                f"subscribers counted {delivered_total} paid deliveries,"
                f" the broker metered {service.meter.delivered}"
            )
        if signature_failures:
            problems.append(f"{signature_failures} signature or device check failures")
        if failed_proofs or unavailable_proofs or pending_proofs:
            problems.append(
                f"sampled proofs not all verified: {failed_proofs} failed,"
                f" {unavailable_proofs} unavailable, {pending_proofs} still pending"
            )
        if verified_proofs == 0:
            problems.append("no sampled proof was verified")
        if anchors == 0:
            problems.append("nothing was anchored on chain")
        if undecrypted:
            problems.append(f"{undecrypted} encrypted messages could not be decrypted")
        if claim_failures:
            problems.append(f"claims not confirmed: {claim_failures}")

        figures: dict[str, Any] = {
            "duration_seconds": duration,
            "elapsed_seconds": round(time.monotonic() - started, 2),
            "devices": len(DEVICES),
            "buyers": len(BUYERS),
            "topics": len(PRICES),
            "encrypted_topics": 1,
            "messages_published": total_published,
            "messages_delivered": service.meter.delivered,
            "messages_verified": sum(t.verified for t in tallies.values()),
            "messages_decrypted": sum(t.decrypted for t in tallies.values()),
            "vouchers_accepted": service.stats.vouchers_accepted,
            "amount_vouchered": sum(vouchered.values()),
            "amount_settled_onchain": sum(r["settled_onchain"] for r in per_channel),
            "paid_to_seller": sum(payouts.values()),
            "fees_to_operator": sum(fees.values()),
            "refunded_to_buyers": sum(refunds.values()),
            "deposits": DEPOSIT * len(BUYERS),
            "claims": len([e for e in claimed_logs if bytes(e["args"]["channelId"]) in by_id]),
            "anchors": anchors,
            "proofs_verified": verified_proofs,
            "proofs_failed": failed_proofs,
            "signature_failures": signature_failures,
            "integrity_events": {
                k: sum(t.events.get(k, 0) for t in tallies.values())
                for k in sorted({k for t in tallies.values() for k in t.events})
            },
            "ratings": ratings,
            "seller_rating_x100": seller_rating,
            "gas_used": gas,
            "dropped_for_credit": service.meter.denied_no_credit,
            "deliveries_denied": service.stats.deliveries_denied,
            "envelopes_refused": service.stats.envelopes_refused,
            "chain_reads_from_sdk_threads": reader.calls,
        }
        return DemoReport(figures, per_channel, problems)
    finally:
        for client in reversed(clients):
            closer: Callable[[], Any] = getattr(client, "close", None) or client.disconnect
            with contextlib.suppress(Exception):
                await asyncio.to_thread(closer)
        await running.stop()


def format_summary(report: DemoReport) -> str:
    """The human summary of a run."""
    f = report.figures
    lines = [
        "",
        "BlendSM demo summary (embedded chain, TEST-ONLY accounts; amounts in wei)",
        f"  devices {f['devices']}, buyers {f['buyers']}, paid topics {f['topics']}"
        f" ({f['encrypted_topics']} end-to-end encrypted), streamed {f['duration_seconds']:g} s",
        f"  messages   published {f['messages_published']}, delivered {f['messages_delivered']},"
        f" signature+device verified {f['messages_verified']}, decrypted {f['messages_decrypted']},"
        f" held back for credit (never charged) {f['dropped_for_credit']}",
        f"  payments   {f['vouchers_accepted']} vouchers accepted, vouchered"
        f" {f['amount_vouchered']}, settled on chain {f['amount_settled_onchain']}"
        f" in {f['claims']} claims",
        f"  money      deposits {f['deposits']} = to seller {f['paid_to_seller']} + operator fees"
        f" {f['fees_to_operator']} + refunds {f['refunded_to_buyers']}",
        f"  integrity  {f['anchors']} anchors on chain, {f['proofs_verified']} sampled proofs"
        f" verified, {f['proofs_failed']} failed, {f['signature_failures']} signature failures",
        f"  ratings    {f['ratings']} (seller average {f['seller_rating_x100'] / 100:.2f}),"
        f" gas used after deployment {f['gas_used']}, elapsed {f['elapsed_seconds']:g} s",
    ]
    for row in report.channels:
        lines.append(
            f"  channel {row['channel'][:10]}..  delivered {row['delivered']}"
            f"  x price = {row['delivered_value']} = vouchered {row['vouchered']}"
            f" = settled {row['settled_onchain']}; refund {row['refund']}"
        )
    if report.ok:
        lines.append(
            "All invariants hold: delivered x price == vouchered == settled on chain per"
            " channel; payouts + fees + refunds == deposits; no signature failures; every"
            " sampled proof verified."
        )
    else:
        lines.append("INVARIANTS BROKEN:")
        lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)
