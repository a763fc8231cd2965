"""Serving a resume request from the replay ring (:mod:`blendsm.broker._replay`).

Why apart: the ring is data kept on the publish path; this is the control path that reads it
for one session, and it reuses the fan-out's pieces so a replayed envelope is an ordinary
delivery: the same gate (access on chain, credit and deposit) per envelope, reserved then
charged only when written (:class:`~blendsm.broker._fanout.Outbox`), a quote or a payment
request as the live path sends them, and, once the credit is used up, the rest held for a
voucher in the session's credit hold (:mod:`blendsm.broker._credit_hold`), exactly as live
deliveries refused for credit are, then dropped uncharged past its bounds. What does not fit
the session's outgoing bound is not sent and reported unserved.

The request is served synchronously (no await between the gate decisions, so the chain view
cannot change under them) inside the control task the service spawned for it (one per
request, counted against ``MAX_CONTROL_TASKS``); nothing here runs per live delivery.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from amqtt.adapters import StreamWriterAdapter
from amqtt.events import MQTTEvents

from blendsm.broker._access import Verdict
from blendsm.broker._backpressure import publish_size
from blendsm.broker._credit_hold import hold_for_credit, holding
from blendsm.broker._fanout import Outbox, deliver_qos0_now
from blendsm.broker._fanout_acked import AckedFrame, deliver_acked
from blendsm.broker._handler import MeteredHandler
from blendsm.broker._replay import ReplayEntry, topic_matches
from blendsm.device_sdk import (
    MAX_UNSERVED,
    Refusal,
    Resumed,
    ResumeRequest,
    Unserved,
    decode_resume_request,
)
from blendsm.errors import WireError

if TYPE_CHECKING:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    from blendsm.broker._access import Identity
    from blendsm.broker._service import MarketplaceService

__all__ = ["MARKS_ATTR", "forget_subscribed", "mark_subscribed", "serve_resume"]

MARKS_ATTR: Final = "blendsm_replay_marks"
"""Session attribute: filter -> the ring's serial when the session subscribed to it."""
BUCKET_ATTR: Final = "blendsm_resume_bucket"
"""Session attribute: its resume token bucket ``[tokens, last refill time]``."""
RESUME_BURST: Final = 16
"""Resume requests a session may send at once (the SDK sends at most 16 per failover)."""
RESUME_PER_SECOND: Final = 1.0
"""Sustained resume requests per session and second: a request scans up to 16 devices over a
topic's ring (~0.3 ms per device at 1000 entries), so a client cannot make the broker spend
more than a few ms a second on them; beyond it the answer is ``refused: rate_limited``."""


def mark_subscribed(service: MarketplaceService, session: Session, topic_filter: str) -> None:
    """The session was granted ``topic_filter``: what the ring admits from now on reaches it
    live, so a resume serves only what came before (no entry twice)."""
    marks: dict[str, int] | None = getattr(session, MARKS_ATTR, None)
    if marks is None:
        marks = {}
        setattr(session, MARKS_ATTR, marks)
    marks[topic_filter] = service.replay.serial  # bounded by the session's filter cap


def forget_subscribed(session: Session, topic_filter: str | None = None) -> None:
    """The session dropped ``topic_filter`` (all its filters with None)."""
    marks: dict[str, int] | None = getattr(session, MARKS_ATTR, None)
    if marks is None:
        return
    if topic_filter is None:
        marks.clear()
    else:
        marks.pop(topic_filter, None)


async def serve_resume(
    service: MarketplaceService,
    handler: BrokerProtocolHandler,
    ident: Identity,
    payload: bytes,
) -> None:
    """Answer one resume request: deliver what the ring holds, then a :class:`Resumed`."""
    try:
        request = decode_resume_request(payload)
    except WireError as exc:
        service._control_log.note("resume request from %s refused: %s", ident.address, exc)
        await service.send_notice(handler, ident, Refusal("malformed", str(exc)[:300]))
        return
    service.stats.replay_requests += 1
    try:
        if not _take_token(handler.session):
            answer = Resumed(request.request_id, request.topic, 0, refused="rate_limited")
        else:
            answer = _serve(service, handler, request)
    except Exception:  # an answer always goes back: the SDK reports the gap
        service.log.exception("resume request from %s failed", ident.address)
        answer = Resumed(request.request_id, request.topic, 0, refused="internal_error")
    if answer.refused is not None:
        service._control_log.note(
            "resume request from %s on %r refused: %s",
            ident.address,
            request.topic[:200],
            answer.refused,
        )
    await service.send_notice(handler, ident, answer)


def _take_token(session: Session | None) -> bool:
    """One resume request off the session's bucket (:data:`RESUME_BURST`, refilled at
    :data:`RESUME_PER_SECOND`); False when it is empty."""
    if session is None:
        return False
    now = time.monotonic()
    bucket: list[float] | None = getattr(session, BUCKET_ATTR, None)
    if bucket is None:
        bucket = [float(RESUME_BURST), now]
        setattr(session, BUCKET_ATTR, bucket)
    tokens = min(float(RESUME_BURST), bucket[0] + (now - bucket[1]) * RESUME_PER_SECOND)
    bucket[1] = now
    if tokens < 1.0:
        bucket[0] = tokens
        return False
    bucket[0] = tokens - 1.0
    return True


def _serve(
    service: MarketplaceService, handler: BrokerProtocolHandler, request: ResumeRequest
) -> Resumed:
    rid, topic, ring = request.request_id, request.topic, service.replay
    if not ring.enabled:
        return Resumed(rid, topic, 0, refused="disabled")
    if not service.view.is_market_topic(topic):
        return Resumed(rid, topic, 0, refused="not_market")
    broker, session = service.broker, handler.session
    granted: int | None = None
    if broker is not None and session is not None:
        for subscribed, qos in broker.subscription_table().match(topic):
            if subscribed is session:
                granted = qos
                break
    if granted is None or broker is None or session is None:
        return Resumed(rid, topic, 0, refused="not_subscribed")
    writer: Any = handler.writer
    if type(handler) is not MeteredHandler or type(writer) is not StreamWriterAdapter:
        # WebSocket sessions write through amqtt's framing; replay is TCP/TLS only so far.
        return Resumed(rid, topic, 0, refused="unsupported_transport")
    marks: dict[str, int] = getattr(session, MARKS_ATTR, None) or {}
    matching = [serial for f, serial in marks.items() if topic_matches(f, topic)]
    mark = min(matching) if matching else ring.serial
    plugins = broker.plugins_manager
    outbox = Outbox(MQTTEvents.PACKET_SENT in plugins._event_plugin_callbacks)
    flow = getattr(writer, "blendsm_flow", None) or service.backpressure.flow(writer)
    gate = service.gate(topic)
    served = 0
    unserved: list[Unserved] = []
    for address, after in request.after.items():
        device = bytes.fromhex(address[2:])
        entries, lowest = ring.after(topic, device, after, mark)
        top = lowest - 1 if lowest is not None else service.dedup.high(device, topic)
        if top is not None and top > after:  # older than the ring (or never received here)
            unserved.append(Unserved(address, after + 1, top))
        done = _deliver(service, handler, session, writer, flow, gate, entries, granted, outbox)
        served += done
        if done < len(entries):
            unserved.append(Unserved(address, entries[done].sequence, entries[-1].sequence))
    sent = outbox.flush(service.meter)
    for s, packet in sent:
        service._spawn(
            plugins.fire_event(MQTTEvents.PACKET_SENT, packet=packet, session=s),
            "blendsm-packet-sent",
        )
    service.stats.replay_served += served
    service.stats.replay_unserved_ranges += len(unserved)
    return Resumed(rid, topic, served, tuple(unserved[:MAX_UNSERVED]))


def _deliver(
    service: MarketplaceService,
    handler: Any,
    session: Session,
    writer: StreamWriterAdapter,
    flow: Any,
    gate: Any,
    entries: list[ReplayEntry],
    granted: int,
    outbox: Outbox,
) -> int:
    """Deliver ``entries`` in order like live ones; how many were written, or held for
    credit (a later voucher sends them), before one could not be (the rest: unserved)."""
    done = 0
    for entry in entries:
        topic, data = entry.topic, entry.data
        qos = min(granted, entry.qos)
        size = publish_size(topic, data)
        if flow is not None and not flow.admits(session, size, 1, *outbox.pending(writer)):
            service.stats.replay_over_bound += 1
            return done
        broadcast = {"session": None, "topic": topic, "data": data, "qos": None}
        held = holding(session, topic)
        if held is not None:  # waiting for credit: queue behind, in order
            held.push(broadcast, topic, data, qos, granted, size)
            done += 1
            continue
        if qos == 0:
            verdict = deliver_qos0_now(service, gate, session, writer, topic, data, outbox)
        else:
            verdict = deliver_acked(handler, session, writer, AckedFrame(topic, data, qos), outbox)
        if verdict is Verdict.NO_CREDIT:
            outbox.write_now(writer, service.meter)  # what is queued goes first
            if not hold_for_credit(
                service, session, broadcast, topic, data, qos, granted, size, flow
            ):
                return done
        elif verdict is None or (isinstance(verdict, Verdict) and verdict is not Verdict.FREE):
            return done  # not writable, in-flight window full, or denied
        done += 1
    return done
