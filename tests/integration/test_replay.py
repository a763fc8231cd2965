"""Resume requests served from a real broker's replay ring (raw MQTT clients, embedded chain):
bounded by ``replay.messages``, unserved ranges reported, replayed envelopes gated and charged
like live ones (held for credit, sent when paid), nothing replayed that the session got live,
and the refusals (not subscribed, disabled, malformed)."""

from __future__ import annotations

from typing import Any

from support import poll

from blendsm.broker import PaymentsConfig, ReplayConfig, SessionsConfig
from blendsm.device_sdk import (
    RESUME,
    PaymentRequest,
    Refusal,
    Resumed,
    ResumeRequest,
    control_topic,
    decode_any_notice,
    decode_resumed,
    encode_resume_request,
    is_resumed_payload,
)

from .conftest import Payer

Market = Any


def _split(messages: list[Any], topic: str) -> tuple[list[bytes], list[Any]]:
    """Payloads on ``topic``, and the notices (resume answers included), in arrival order."""
    data = [m.payload for m in messages if m.topic == topic]
    notices = [
        decode_resumed(m.payload) if is_resumed_payload(m.payload) else decode_any_notice(m.payload)
        for m in messages
        if m.topic.endswith("/notice")
    ]
    return data, notices


async def _resume(market: Market, client: Any, after: int, rid: str = "r1") -> None:
    device = market.chain.addr("device")
    request = ResumeRequest(rid, market.topic, {device: after})
    topic = control_topic(market.chain.addr("buyer"), RESUME)
    await client.publish(topic, encode_resume_request(request), qos=0)


async def test_resume_serves_the_ring_charged_like_live_and_reports_what_it_evicted(
    start_market: Any,
) -> None:
    market = await start_market(replay=ReplayConfig(messages=10))
    service = market.service
    device = await market.connected_device()
    for i in range(1, 21):  # sequences 1..20; the ring keeps 11..20
        await device.publish(market.topic, b"m%d" % i)
    assert await poll(lambda: len(service.replay) == 10, 10)
    buyer, channel = await market.channel_client("buyer")
    await _resume(market, buyer, 0, "early")
    _, notices = _split(await buyer.got.drain(within=0.5), market.topic)
    assert [(n.request_id, n.refused) for n in notices] == [("early", "not_subscribed")]
    assert await buyer.subscribe(market.topic) == [0]
    await _resume(market, buyer, 0)
    data, notices = _split(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(11, 16)]  # credit_messages = 5
    requests = [n for n in notices if isinstance(n, PaymentRequest)]
    assert [r.charged for r in requests] == [5 * market.price]
    answer = next(n for n in notices if isinstance(n, Resumed))
    assert answer.request_id == "r1"
    assert answer.served == 10  # 5 written, 5 held for credit
    assert [(u.first, u.last) for u in answer.unserved] == [(1, 10)]  # evicted
    account = service.meter.accounts[channel]
    assert account.charged == 5 * market.price

    await Payer(market, "buyer", buyer).pay(channel, 5 * market.price)
    data, _ = _split(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m%d" % i for i in range(16, 21)]  # the held ones, when paid
    assert account.charged == 10 * market.price

    # What reaches the session live is never replayed (it would be charged twice).
    await Payer(market, "buyer", buyer).pay(channel, 10 * market.price)
    for i in range(21, 23):
        await device.publish(market.topic, b"m%d" % i)
    data, _ = _split(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m21", b"m22"]
    await _resume(market, buyer, 18, "r2")
    data, notices = _split(await buyer.got.drain(within=1.0), market.topic)
    assert data == [b"m19", b"m20"]  # admitted before the SUBSCRIBE: replayed, paid again
    answer = next(n for n in notices if isinstance(n, Resumed))
    assert (answer.served, answer.unserved) == (2, ())
    assert account.charged == 14 * market.price
    assert service.stats.replay_requests == 3


async def test_resume_refusals(start_market: Any) -> None:
    market = await start_market(replay=ReplayConfig(messages=0))
    device = await market.connected_device()
    await device.publish(market.topic, b"m1")
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    await _resume(market, buyer, 0, "disabled")
    await buyer.publish(control_topic(market.chain.addr("buyer"), RESUME), b"{}", qos=0)
    data, notices = _split(await buyer.got.drain(within=1.0), market.topic)
    assert data == []
    answers = [(n.request_id, n.refused) for n in notices if isinstance(n, Resumed)]
    assert answers == [("disabled", "disabled")]
    assert any(isinstance(n, Refusal) and n.code == "malformed" for n in notices)
    refused: list[str | None] = []
    for batch in range(3):  # 24 requests in about 2 s: 16 at once, then about one a second
        for i in range(8):  # (8 at a time: within the control-task bound, none dropped)
            await _resume(market, buyer, 0, f"flood-{batch}-{i}")
        _, notices = _split(await buyer.got.drain(within=0.5), market.topic)
        refused += [n.refused for n in notices if isinstance(n, Resumed)]
    assert len(refused) == 24
    assert 3 <= refused.count("rate_limited") <= 9
    assert market.service.meter.accounts.get(channel) is None or (
        market.service.meter.accounts[channel].charged == 0
    )


async def test_what_does_not_fit_the_sessions_outgoing_bound_is_reported_unserved(
    start_market: Any,
) -> None:
    market = await start_market(
        sessions=SessionsConfig(max_outgoing_bytes=4096),
        payments=PaymentsConfig(credit_messages=50),
    )
    device = await market.connected_device()
    for i in range(1, 11):
        await device.publish(market.topic, b"%04d" % i + b"x" * 1000)
    assert await poll(lambda: len(market.service.replay) == 10, 10)
    buyer, channel = await market.channel_client("buyer")
    assert await buyer.subscribe(market.topic) == [0]
    await _resume(market, buyer, 0)
    data, notices = _split(await buyer.got.drain(within=1.0), market.topic)
    answer = next(n for n in notices if isinstance(n, Resumed))
    assert 1 <= answer.served < 10
    assert [(u.first, u.last) for u in answer.unserved] == [(answer.served + 1, 10)]
    assert [d[:4] for d in data] == [b"%04d" % i for i in range(1, answer.served + 1)]
    account = market.service.meter.accounts[channel]
    assert account.charged == answer.served * market.price  # only what was written
