"""The marketplace service: identity, access, metering and vouchers for one broker.

Why one object: the auth decision, the SUBSCRIBE/PUBLISH/RECEIVE decisions, the per-delivery
credit gate and the voucher intake all read the same in-memory state (the chain view and the
meter), and the broker subclass and the amqtt plugin both need it. Every decision here is a
synchronous dict lookup; only voucher storage and notices are awaited, off the delivery path.

The decisions themselves (CONNECT, SUBSCRIBE, PUBLISH, RECEIVE, the delivery gate) are
:class:`~blendsm.broker._access.AccessDecisions`, and the intake of signed envelopes is
:class:`~blendsm.broker._envelope_intake.EnvelopeIntake`; this service extends them with the wiring:
stores, chain view, settlement and anchoring tasks, notices and chain events; vouchers are
taken in by :class:`~blendsm.broker._voucher_intake.VoucherIntake` (batched, group-committed).
Failed chain requests of those tasks are counted by :mod:`blendsm.broker._chain_errors`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from blendsm.broker._access import Identity, Verdict
from blendsm.broker._anchor_records import AnchorRecord
from blendsm.broker._anchors import AnchorConfig, Anchorer
from blendsm.broker._backpressure import Backpressure, publish_size
from blendsm.broker._chain_errors import (
    CHAIN_ERROR_SOURCES,
    ChainErrors,
    chain_source,
    count_chain_errors,
)
from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import BrokerConfig, resolve_broker_account
from blendsm.broker._dedup import DedupWindow
from blendsm.broker._envelope_intake import EnvelopeIntake
from blendsm.broker._lanes import check_lane
from blendsm.broker._leaf_store import AsyncLeafStore
from blendsm.broker._log_limit import LogLimiter
from blendsm.broker._meter import Charge, Meter
from blendsm.broker._replay import ReplayRing
from blendsm.broker._shutdown import wait_bounded
from blendsm.broker._stats import ServiceStats
from blendsm.broker._store import AsyncVoucherStore
from blendsm.broker._voucher_intake import MAX_CONTROL_TASKS, VoucherIntake
from blendsm.contracts import ChainEvent, Deployment, Marketplace
from blendsm.device_sdk import (
    ANCHORS_TOPIC,
    NOTICE,
    PROOF,
    RESUME,
    VOUCHER,
    AnyNotice,
    ConnectTokenVerifier,
    MessageDomain,
    PaymentRequest,
    Quote,
    Refusal,
    Resumed,
    VoucherDomain,
    VoucherVerifier,
    control_topic,
    decode_proof_request,
    encode_anchor_notice,
    encode_notice,
    encode_resumed,
    parse_control_topic,
)
from blendsm.errors import (
    WireError,
)

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    from blendsm.broker._settlement import Settler

__all__ = [
    "CHAIN_ERROR_SOURCES",
    "ChainErrors",
    "Identity",
    "MarketplaceService",
    "ServiceStats",
    "Verdict",
]

_log = logging.getLogger("blendsm.broker")

DUPLICATE_LOG_INTERVAL: Final = 60.0
"""Seconds between the INFO lines that count dropped duplicate envelopes (each one: DEBUG)."""

DELIVERED_SAVE_SECONDS: Final = 1.0
"""How often the delivered value of channels charged since the last write is stored, when no
voucher batch carried it (one small transaction, nothing when nothing was delivered). After a
kill the stored value lags by at most the deliveries of this long, which only makes the broker
claim less."""


class MarketplaceService(EnvelopeIntake):
    """Chain-backed identity, access control, metering and voucher intake for one broker."""

    def __init__(
        self,
        *,
        config: BrokerConfig,
        w3: AsyncWeb3[Any],
        deployment: Deployment,
        operator: LocalAccount,
        view: ChainView | None = None,
        logger: logging.Logger | None = None,
        token_validity: int = 60,
        settler_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.w3 = w3
        self.deployment = deployment
        self.operator = operator
        self.log = logger or _log
        self.public_topics = config.public_topics
        self.view = view or ChainView(
            w3,
            deployment,
            confirmations=config.chain.confirmations,
            poll_interval=config.chain.poll_interval,
            max_staleness=config.chain.staleness_limit,
            logger=self.log.getChild("chain"),
        )
        broker_key = resolve_broker_account(config)
        self.lane: str = (broker_key or operator).address
        """This broker's lane of every channel: its own key (``broker_key``), by default the
        operator's. It meters, stores and claims that lane only (issue 14)."""
        self.meter = Meter(operator.address, config.payments.credit_messages)
        self.meter.lane_claimed = lambda channel_id: self.view.lane_claimed(channel_id, self.lane)
        self.tokens = ConnectTokenVerifier(
            deployment.chain_id, operator.address, validity=token_validity
        )
        self.vouchers = VoucherVerifier(
            VoucherDomain(deployment.chain_id, deployment.address("PaymentChannels"))
        )
        self.messages = MessageDomain(deployment.chain_id, deployment.address("Registry"))
        self.marketplace = Marketplace(
            w3, deployment, operator, confirmations=config.chain.confirmations
        )
        self.stats = ServiceStats()
        self.backpressure = Backpressure(config.sessions, self.stats)
        self.backpressure.on_resume = self._resume_replay
        self.dedup = DedupWindow(config.payments.dedup_max_pairs)
        self.replay = ReplayRing(config.replay)
        self._duplicates_log = LogLimiter(self.log, interval=DUPLICATE_LOG_INTERVAL)
        self._control_log = LogLimiter(self.log, logging.WARNING)
        self._denied_log = LogLimiter(self.log)
        self._serving_log = LogLimiter(self.log)
        self.view.serve_as(operator.address)
        self.chain_errors = ChainErrors()
        self.store: AsyncVoucherStore | None = None
        self.settler: Settler | None = None
        self.anchorer: Anchorer | None = None
        self._anchor_task: asyncio.Task[None] | None = None
        self.broker: Any = None  # the BlendBroker serving this service
        self._tasks: set[asyncio.Task[Any]] = set()
        self._view_task: asyncio.Task[None] | None = None
        self._settler_task: asyncio.Task[None] | None = None
        self._delivered_task: asyncio.Task[None] | None = None
        self._unlisten: Any = None
        self._settler_options = settler_options or {}
        self.intake = VoucherIntake(self, config.payments.intake)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, *, sync_timeout: float = 30.0) -> None:
        """Open the voucher store, follow the chain and start settling.

        A chain that cannot be reached at start does not stop the broker: the view stays
        unhealthy (market decisions answer no) and keeps retrying in the background."""
        from blendsm.broker._settlement import Settler

        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = await AsyncVoucherStore.open(
            data_dir / "vouchers.sqlite3", lane=self.lane, legacy_lane=self.operator.address
        )
        await check_lane(self)
        paid = []
        for channel_id in await self.store.channels():
            latest = await self.store.latest(channel_id)
            if latest is not None:
                paid.append((channel_id, latest.cumulative_amount))
        self.meter.load_paid(paid)
        self.meter.load_delivered(await self.store.delivered())
        self._delivered_task = asyncio.create_task(
            self._save_delivered_every(DELIVERED_SAVE_SECONDS), name="blendsm-delivered"
        )
        self._unlisten = self.view.on_change(self._on_chain_event)
        count_chain_errors(self.w3)
        self._view_task = asyncio.create_task(
            self.view.run(), name="blendsm-chain-view", context=self._chain_source("chain_view")
        )
        deadline = time.monotonic() + sync_timeout
        while not self.view.synced and time.monotonic() < deadline:
            if self._view_task.done():
                break
            await asyncio.sleep(0.02)
        if not self.view.synced:
            self.log.warning(
                "chain view not synced after %.0fs; market decisions answer no until it is",
                sync_timeout,
            )
        elif self.view.brokers_deployed and not self.view.operator_active():
            self.log.warning(
                "operator %s is not an active Operator in the Registry: Brokers.isServing is"
                " false for it, so every market topic is refused here until the oracle admits it",
                self.operator.address,
            )
        self.settler = Settler(
            self.store,
            self.marketplace,
            self.view,
            self.config.payments.settlement,
            logger=self.log.getChild("settlement"),
            confirmations=self.config.chain.confirmations,
            delivered=self.meter.delivered_value,
            **self._settler_options,
        )
        self._settler_task = asyncio.create_task(
            self.settler.run(), name="blendsm-settlement", context=self._chain_source("settlement")
        )
        leaves = await AsyncLeafStore.open(
            data_dir / "leaves.sqlite3", self.log.getChild("anchors")
        )
        # What was admitted before a restart stays admitted (one query, before any PUBLISH).
        cap = self.dedup.max_pairs
        marks = await leaves.high_sequences(cap + 1)
        self.dedup.seed_all(marks[-cap:], truncated=len(marks) > cap)
        self.anchorer = Anchorer(
            leaves,
            self.marketplace,
            AnchorConfig.of(self.config.anchoring, self.config.chain.confirmations),
            logger=self.log.getChild("anchors"),
            on_anchored=self._on_anchored,
            seller_of=self.seller_of,
        )
        self.meter.on_delivered = self.anchorer.delivered
        await self.report_unhanded()
        self._anchor_task = asyncio.create_task(
            self.anchorer.run(), name="blendsm-anchors", context=self._chain_source("anchors")
        )
        self.log.info(
            "marketplace service started: operator %s, chain id %d, public topics %s",
            self.operator.address,
            self.deployment.chain_id,
            "on" if self.public_topics else "off",
        )

    async def stop(self, within: float | None = None) -> None:
        """Stop settling and following; wait for in-flight work (voucher writes, a claim or
        an anchor) at most ``within`` s (``limits.shutdown_seconds``), cancel the rest (it
        resumes from its write-ahead record at the next start); close the stores."""
        if self.settler is not None:
            self.settler.stop()
        if self.anchorer is not None:
            self.anchorer.stop()
        self.view.stop()
        work = [t for t in (self._settler_task, self._anchor_task, self._view_task) if t]
        budget = self.config.limits.shutdown_seconds if within is None else within
        # The intake finishes its queued vouchers (durable before they count) while the
        # settler and anchorer unwind; anything cut off is re-sent by its buyer.
        await wait_bounded([*work, self.intake.close(), *self._tasks], budget, "service stop")
        if self._unlisten is not None:
            self._unlisten()
        if self._delivered_task is not None:
            self._delivered_task.cancel()
            await asyncio.gather(self._delivered_task, return_exceptions=True)
            self._delivered_task = None
        if self.store is not None:
            await self._save_delivered(everything=True)  # no more deliveries: the final value
            await self.store.close()
            self.store = None
        if self.anchorer is not None:
            await self.anchorer.store.close()
            self.anchorer = None

    async def _save_delivered(self, *, everything: bool = False) -> None:
        """Store the delivered value of every channel charged since the last write (of every
        charged channel with ``everything``: a cancelled periodic write may have taken some)."""
        values = self.meter.unsaved_delivered(everything=everything)
        if not values or self.store is None:
            return
        try:
            await self.store.record_delivered(values)
        except Exception as exc:  # kept for the next write; a lag only under-claims
            self.meter.delivered_not_saved(values)
            self.log.error(
                "storing the delivered value of %d channel(s) failed: %s", len(values), exc
            )

    async def _save_delivered_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._save_delivered()

    def _chain_source(self, source: str) -> contextvars.Context:
        """A context whose chain requests count as this broker's ``source``."""
        return chain_source(self.chain_errors, source)

    def _spawn(self, coro: Any, name: str, ident: Identity | None = None) -> None:
        """Run ``coro`` in a tracked task; with ``ident``, counted against that session's
        ``MAX_CONTROL_TASKS`` until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if ident is not None:
            ident.control_tasks += 1
            task.add_done_callback(
                lambda _: setattr(ident, "control_tasks", ident.control_tasks - 1)
            )

    def quote_for(self, session: Session, charge: Charge) -> Quote | None:
        """The Quote to send before this delivery, if the session has not seen this price
        and channel for the topic yet."""
        ident: Identity = session.blendsm
        account = charge.account
        current = (account.channel_id, charge.price)
        if ident.quoted.get(charge.topic) == current:
            return None
        ident.quoted[charge.topic] = current
        self.stats.quotes += 1
        return Quote(
            topic=charge.topic,
            seller=account.seller,
            channel_id=account.channel_id,
            price=charge.price,
            credit=self.meter.credit_of(charge.price),
            charged=account.charged,
            paid=account.paid,
            lane=self.lane,
        )

    def payment_request_for(self, session: Session) -> PaymentRequest | None:
        """The payment request owed after a NO_CREDIT verdict: once per session and paid
        amount, so every new session of the buyer (e.g. after a crash that lost the last
        request with its connection) is asked again; none while a voucher of the channel
        is queued in the intake or being committed."""
        ident: Identity | None = getattr(session, "blendsm", None)
        if ident is None or ident.owing is None:
            return None
        account, topic = ident.owing, ident.owing_topic
        if ident.requested.get(account.channel_id) == account.paid:
            return None
        if self.intake.withhold_request(account.channel_id):
            # A voucher of the channel is on its way: the payer is paying, and a request
            # now only made it sign a second one (the SDK answers a request with what it
            # received). Not marked as asked: a refusal after that voucher asks again.
            return None
        ident.requested[account.channel_id] = account.paid
        self.stats.payment_requests += 1
        price = self.view.topic_for_name(topic)
        credit = self.meter.credit_of(price.price) if price is not None else 0
        return PaymentRequest(
            channel_id=account.channel_id,
            charged=account.charged,
            paid=account.paid,
            credit=credit,
            topic=topic,
            lane=self.lane,
        )

    # --- control topics: vouchers in, notices out ---------------------------------------

    def on_control_publish(
        self, session: Session, handler: BrokerProtocolHandler, topic: str, data: bytes | bytearray
    ) -> None:
        """A client PUBLISHed under the control root: vouchers go to the intake (no task),
        proof requests to a task, the rest is refused. Never broadcast; nothing here blocks
        the client's read loop."""
        ident = self.identity(session)
        parsed = parse_control_topic(topic)
        if ident is not None and ident.key and parsed == (ident.key, VOUCHER):
            self.intake.submit(handler, ident, bytes(data))
            return
        if ident is not None and ident.control_tasks >= MAX_CONTROL_TASKS:
            self.stats.control_dropped += 1
            self._control_log.note(
                "control PUBLISH from %s dropped: %d still in process (flood)",
                ident.address,
                ident.control_tasks,
            )
            return
        if ident is not None and ident.key and parsed == (ident.key, PROOF):
            self._spawn(self._answer_proof(handler, ident, bytes(data)), "blendsm-proof", ident)
            return
        if ident is not None and ident.key and parsed == (ident.key, RESUME):
            from blendsm.broker._replay_serve import serve_resume  # imports the fan-out

            host: Any = self  # mypy sees this file as broker._service, the import as blendsm's
            self._spawn(serve_resume(host, handler, ident, bytes(data)), "blendsm-resume", ident)
            return
        self.stats.vouchers_refused += 1
        who = ident.address if ident is not None else None
        self._control_log.note(
            "control PUBLISH to %r refused for %s: not its voucher topic", topic[:200], who
        )
        if ident is not None and ident.key:
            refusal = Refusal("wrong_topic", f"cannot publish to {topic[:200]!r}")
            self._spawn(self.send_notice(handler, ident, refusal), "blendsm-notice", ident)

    async def _answer_proof(
        self, handler: BrokerProtocolHandler, ident: Identity, payload: bytes
    ) -> None:
        try:
            request = decode_proof_request(payload)
        except WireError as exc:
            await self.send_notice(handler, ident, Refusal("malformed", str(exc)[:300]))
            return
        anchorer = self.anchorer
        if anchorer is None:
            answer: AnyNotice = Refusal(
                "proof_unavailable", "broker is shutting down", request_id=request.request_id
            )
        else:
            try:
                answer = await anchorer.answer(request)
            except Exception as exc:
                self.log.exception("proof request from %s failed", ident.address)
                answer = Refusal(
                    "proof_unavailable",
                    f"internal error: {type(exc).__name__}",
                    request_id=request.request_id,
                )
        if not isinstance(answer, Refusal):
            self.stats.proofs_served += 1
        await self.send_notice(handler, ident, answer)

    def _on_anchored(self, record: AnchorRecord) -> None:
        broker = self.broker
        if broker is None:
            return
        self.stats.anchor_notices += 1
        self._spawn(
            broker.internal_message_broadcast(
                ANCHORS_TOPIC, encode_anchor_notice(record.notice()), 0
            ),
            "blendsm-anchor-notice",
        )

    async def send_notice(
        self, handler: BrokerProtocolHandler, ident: Identity, notice: AnyNotice | Resumed
    ) -> None:
        """Send a notice straight to this session (never broadcast), QoS 0: encoded here and
        handed to the session's transport in one write, as the fan-out writes its quotes and
        payment requests, rather than through amqtt's ``mqtt_publish`` (a packet object, its
        encoder, the write lock, a drain and a PACKET_SENT event fired as a Task per plugin:
        ~90 µs per Receipt, one per few vouchers, on the paid path). A notice is ours; no
        plugin waits for it. It shares the session's outgoing bound with its deliveries
        (:mod:`~blendsm.broker._backpressure`): not sent to a session over it (counted).
        Kept ``async`` for its callers; it never waits."""
        if not self.write_notices(handler, ident, (notice,)):
            # a WebSocket session: its frames are amqtt's to write
            await self._send_notice_framed(handler, ident, notice)

    def write_notices(
        self,
        handler: BrokerProtocolHandler,
        ident: Identity,
        notices: Sequence[AnyNotice | Resumed],
    ) -> bool:
        """:meth:`send_notice` for each of ``notices``, now, with no task: the voucher intake
        answers every batch with receipts, and a Task per answer cost more than the write.
        False (nothing written) when the session's writer is not an asyncio transport (MQTT
        over WebSocket): the caller then awaits :meth:`send_notice`, which frames them."""
        if not ident.key or handler.session is None or handler.writer is None:
            return True  # no one to send to: done
        writer = handler.writer
        stream = getattr(writer, "_writer", None)  # amqtt's StreamWriterAdapter over asyncio's
        if stream is None:
            return False
        for notice in notices:
            self._write_notice(handler, ident, writer, stream.transport, notice)
        return True

    def _write_notice(
        self,
        handler: BrokerProtocolHandler,
        ident: Identity,
        writer: Any,
        transport: Any,
        notice: AnyNotice | Resumed,
    ) -> None:
        if getattr(writer, "is_closed", False) or transport.is_closing():
            return
        data = _publish_qos0(control_topic(ident.key, NOTICE), _notice_payload(notice))
        flow = self.backpressure.flow(writer)
        if flow is not None and not flow.admits(handler.session, len(data)):
            self.stats.notices_dropped_slow_consumer += 1
            return
        try:
            transport.write(data)
        except Exception as exc:
            self.log.info("notice to %s not sent: %s", ident.address, exc)
            return
        if flow is not None:
            flow.wrote(len(data), 1)

    async def _send_notice_framed(
        self, handler: BrokerProtocolHandler, ident: Identity, notice: AnyNotice | Resumed
    ) -> None:
        """:meth:`send_notice` for a session whose writer is not an asyncio transport (MQTT
        over WebSocket): through amqtt's ``mqtt_publish``, which frames and drains, held
        against the session's outgoing bound while it is written."""
        from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

        if not ident.key or handler.session is None:
            return
        topic = control_topic(ident.key, NOTICE)
        payload = _notice_payload(notice)
        size = publish_size(topic, payload)
        flow = self.backpressure.flow(handler.writer)
        if flow is not None:
            if not flow.admits(handler.session, size):
                self.stats.notices_dropped_slow_consumer += 1
                return
            flow.task_started(size)
        try:
            await BrokerProtocolHandler.mqtt_publish(handler, topic, payload, 0, False)
        except Exception as exc:
            self.log.info("notice to %s not sent: %s", ident.address, exc)
        finally:
            if flow is not None:
                flow.task_ended(size)

    def _resume_replay(self, session: Session) -> None:
        """A session paused over its outgoing bound drained: replay what was queued."""
        if self.broker is not None:
            self.broker.resume_offline_replay(session)

    # --- chain events --------------------------------------------------------------------

    async def _on_chain_event(self, event: ChainEvent) -> None:
        if event.contract == "PaymentChannels":
            info = self.view.channel_record(bytes(event.args["channelId"]))
            if info is not None:
                self.meter.channel_changed(info)
            return
        if event.contract != "Registry":
            return
        name = event.event
        if name in ("Revoked", "Left", "Rejected"):
            account = str(event.args["account"]).lower()
            await self._disconnect(
                lambda i: i.key == account or i.seller_key == account,
                f"{name.lower()} in the Registry",
            )
        elif name == "DeviceRemoved":
            device = str(event.args["device"]).lower()
            await self._disconnect(lambda i: i.key == device, "device removed from the Registry")

    async def _disconnect(self, match: Any, reason: str) -> None:
        if self.broker is None:
            return
        count = await self.broker.disconnect_matching(match, reason)
        self.stats.disconnects_revoked += count


def _notice_payload(notice: AnyNotice | Resumed) -> bytes:
    """A notice's payload (a resume answer is encoded by :mod:`blendsm.device_sdk._resume`)."""
    return encode_resumed(notice) if isinstance(notice, Resumed) else encode_notice(notice)


def _publish_qos0(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH (MQTT 3.1.1, not retained, not dup), encoded by hand: amqtt's
    ``PublishPacket`` costs tens of µs to build and encode."""
    name = topic.encode()
    n = 2 + len(name) + len(payload)
    length = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | 0x80 if n else byte)
        if not n:
            break
    return b"\x30" + bytes(length) + len(name).to_bytes(2, "big") + name + payload
