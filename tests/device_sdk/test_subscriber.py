"""The paying Subscriber against a real stock amqtt broker (127.0.0.1, free port).

The BlendSM broker's side of the control protocol is played by a plain paho client
(``Operator``): it publishes quotes, payment requests, receipts and refusals on the
subscriber's notice topic and paid data on a market topic, and collects the vouchers the
subscriber publishes, whose signatures are checked for real under an arbitrary domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from eth_account import Account
from eth_utils import to_checksum_address
from paho.mqtt.enums import CallbackAPIVersion
from support import wait_until
from support.stock_amqtt import StockBroker as _StockBroker
from support.stock_amqtt import free_port

from blendsm.contracts import Marketplace
from blendsm.device_sdk import (
    ConnectTokenVerifier,
    Disconnection,
    PaymentEvent,
    PaymentEventKind,
    PaymentRequest,
    Quote,
    Receipt,
    ReceivedMessage,
    Refusal,
    Subscriber,
    SubscriberCallbackAPI,
    Voucher,
    VoucherDomain,
    control_topic,
    decode_voucher,
    encode_notice,
    parse_connect_token,
    recover_voucher_signer,
)
from blendsm.device_sdk._subscriber_payments import RESEND_AFTER
from blendsm.errors import (
    BlendsmError,
    BrokerConnectionError,
    BrokerRefusedError,
    ConfigError,
    SubscriptionRefusedError,
    WireError,
)

CHAIN_ID = 31337
CONTRACT = "0x" + "ab" * 20
BUYER = Account.from_key(bytes.fromhex("5a" * 32))
OPERATOR = Account.from_key(bytes.fromhex("22" * 32)).address
SELLER = Account.from_key(bytes.fromhex("33" * 32)).address
CHANNEL = bytes.fromhex("c1" * 32)
OTHER_CHANNEL = bytes.fromhex("c2" * 32)
TOPIC = "market/temp/1"
PRICE = 1_000
DOMAIN = VoucherDomain(CHAIN_ID, CONTRACT)

# What the test auth plugin saw and whom it refuses (amqtt loads plugins by dotted path).
SEEN: list[tuple[str, str | None, str | None]] = []
REFUSED_USERS: set[str] = set()
DENIED_PREFIXES: set[str] = {"denied/"}
BUYER_GATE = threading.Event()  # while clear, the buyer's CONNECT waits (the operator goes first)
BUYER_GATE.set()


class RecordingAuth(BaseAuthPlugin):
    """Accepts everyone but REFUSED_USERS and records (client id, user name, password); holds
    the buyer's CONNECT while BUYER_GATE is clear."""

    async def authenticate(self, *, session: Session) -> bool:
        SEEN.append((session.client_id, session.username, session.password))
        while session.username == BUYER.address and not BUYER_GATE.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return session.username not in REFUSED_USERS


class DenyTopics(BaseTopicPlugin):
    """Refuses subscriptions to filters under DENIED_PREFIXES; allows everything else."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool:
        denied = action == Action.SUBSCRIBE and (topic or "").startswith(tuple(DENIED_PREFIXES))
        return not denied


class StockBroker(_StockBroker):
    """The shared stock broker (its shutdown survives amqtt's stuck reader) with this module's
    recording auth and topic plugins, on a fresh free port."""

    def __init__(self) -> None:
        super().__init__(
            free_port(), {f"{__name__}.RecordingAuth": {}, f"{__name__}.DenyTopics": {}}
        )


@pytest.fixture
def broker(closing: Callable[[StockBroker], StockBroker]) -> StockBroker:
    SEEN.clear()
    REFUSED_USERS.clear()
    DENIED_PREFIXES.intersection_update({"denied/"})
    BUYER_GATE.set()
    return closing(StockBroker().start())


class Operator:
    """Plays the BlendSM broker's control side with a raw paho client."""

    def __init__(self, port: int) -> None:
        self.vouchers: queue.Queue[Voucher] = queue.Queue()
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-operator")
        c.on_message = lambda _c, _u, m: self.vouchers.put(decode_voucher(m.payload))
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        c.subscribe("blendsm/ctl/+/voucher", 1)
        assert self.subscribed.wait(5)
        self.mqtt = c

    def notice(self, address: str, notice: Any) -> None:
        self.raw_notice(address, encode_notice(notice))

    def raw_notice(self, address: str, payload: bytes) -> None:
        self.mqtt.publish(control_topic(address, "notice"), payload, qos=1).wait_for_publish(5)

    def data(self, topic: str, payload: bytes = b"21.5C") -> None:
        self.mqtt.publish(topic, payload, qos=1).wait_for_publish(5)

    def drain(self, expect: int = 0, within: float = 5.0, quiet: float = 0.3) -> list[Voucher]:
        """The ``expect`` vouchers due (waiting up to ``within`` s for each), plus any extra
        that arrives in the next ``quiet`` seconds (so a test sees one voucher too many)."""
        got: list[Voucher] = []
        with contextlib.suppress(queue.Empty):
            while len(got) < expect:
                got.append(self.vouchers.get(timeout=within))
            while True:
                got.append(self.vouchers.get(timeout=quiet))
        return got

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def operator(broker: StockBroker, closing: Callable[[Operator], Operator]) -> Operator:
    return closing(Operator(broker.port))


class Recorder:
    """Collects what the Subscriber's callbacks report."""

    def __init__(self, sub: Subscriber) -> None:
        self.messages: queue.Queue[ReceivedMessage] = queue.Queue()
        self.events: list[PaymentEvent] = []
        self.errors: list[BlendsmError] = []
        self.disconnects: list[Disconnection] = []
        sub.on_message = lambda _s, m: self.messages.put(m)
        sub.on_payment = lambda _s, e: self.events.append(e)
        sub.on_error = lambda _s, e: self.errors.append(e)
        sub.on_disconnect = lambda _s, d: self.disconnects.append(d)

    def take(self, n: int, within: float = 5.0) -> list[ReceivedMessage]:
        return [self.messages.get(timeout=within) for _ in range(n)]

    def kinds(self, *kinds: PaymentEventKind) -> list[PaymentEvent]:
        return [e for e in self.events if e.kind in kinds]


@pytest.fixture
def make_sub(broker: StockBroker) -> Iterator[Callable[..., tuple[Subscriber, Recorder]]]:
    made: list[Subscriber] = []

    def make(**kwargs: Any) -> tuple[Subscriber, Recorder]:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": broker.port,
            "broker": OPERATOR,
            "chain_id": CHAIN_ID,
            "channels_contract": CONTRACT,
            # These tests follow each voucher: one per message unless a test says otherwise
            # (the default schedule, half the quoted credit, is tested on its own below and
            # against a real broker in tests/integration/test_payment_schedule.py).
            "pay_every": 1,
            **kwargs,
        }
        sub = Subscriber(options.pop("account", BUYER), **options)
        made.append(sub)
        return sub, Recorder(sub)

    yield make
    for sub in made:
        sub.disconnect()


def quote(price: int = PRICE, channel: bytes = CHANNEL, topic: str = TOPIC) -> Quote:
    return Quote(topic, SELLER, channel, price, credit=3 * price, charged=0, paid=0)


def start_paid(
    sub: Subscriber, operator: Operator, q: Quote | None = None, topic: str = TOPIC
) -> None:
    """Connect, subscribe to ``topic`` and deliver its quote."""
    sub.connect(5)
    assert sub.subscribe(topic, 1) == 1
    q = q or quote(topic=topic)
    operator.notice(sub.address, q)
    wait_until(lambda: sub.quote(q.topic) == q)


def check_signed(vouchers: list[Voucher]) -> list[int]:
    """Amounts of ``vouchers``, each checked to be the buyer's real signature on CHANNEL."""
    for v in vouchers:
        assert v.channel_id == CHANNEL
        assert recover_voucher_signer(DOMAIN, v) == BUYER.address
    return [v.cumulative_amount for v in vouchers]


# --------------------------------------------------------------------------- payment


@pytest.mark.parametrize(
    ("pay_every", "messages", "expected"),
    [
        (1, 5, [1000, 2000, 3000, 4000, 5000]),
        (3, 7, [3000, 6000]),
        (3, 9, [3000, 6000, 9000]),
    ],
)
def test_vouchers_pay_exactly_what_was_received(
    make_sub: Any, operator: Operator, pay_every: int, messages: int, expected: list[int]
) -> None:
    sub, rec = make_sub(pay_every=pay_every)
    start_paid(sub, operator)
    for i in range(messages):
        operator.data(TOPIC, f"m{i}".encode())
    got = rec.take(messages)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(messages)]
    assert all(m.paid and m.price == PRICE and m.channel_id == CHANNEL for m in got)
    assert check_signed(operator.drain(len(expected))) == expected
    assert sub.received_value(CHANNEL) == messages * PRICE
    assert sub.vouchered(CHANNEL) == expected[-1] == sub.spent
    stats = sub.stats
    assert (stats.messages, stats.paid_messages, stats.vouchers_sent) == (
        messages,
        messages,
        len(expected),
    )
    assert [e.amount for e in rec.kinds(PaymentEventKind.VOUCHER_SENT)] == expected


def test_price_change_applies_to_later_messages(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub()
    start_paid(sub, operator)
    operator.data(TOPIC)
    rec.take(1)
    operator.notice(sub.address, quote(price=250))
    wait_until(lambda: (q := sub.quote(TOPIC)) is not None and q.price == 250)
    operator.data(TOPIC)
    operator.data(TOPIC)
    assert [m.price for m in rec.take(2)] == [250, 250]
    assert check_signed(operator.drain(3)) == [1000, 1250, 1500]


def test_the_default_schedule_pays_at_half_the_quoted_credit_then_the_tail_on_a_timer(
    make_sub: Any, operator: Operator
) -> None:
    sub, rec = make_sub(pay_every=None, pay_within=1.0)
    start_paid(sub, operator, Quote(TOPIC, SELLER, CHANNEL, PRICE, 10 * PRICE, 0, 0))
    for _ in range(12):
        operator.data(TOPIC)
    rec.take(12)
    assert check_signed(operator.drain(2)) == [5 * PRICE, 10 * PRICE]  # every 5: half of 10
    assert check_signed(operator.drain(1)) == [12 * PRICE]  # the last 2, by the timer
    assert sub.stats.vouchers_sent == 3


@pytest.mark.parametrize("pay_within", [0, -1.0, 3601, float("nan"), "1", True])
def test_pay_within_out_of_range_is_refused(pay_within: object) -> None:
    with pytest.raises(ConfigError, match="pay_within"):
        Subscriber(
            BUYER,
            host="127.0.0.1",
            port=1883,
            broker=OPERATOR,
            chain_id=CHAIN_ID,
            channels_contract=CONTRACT,
            pay_within=pay_within,
        )


def test_budget_stops_payment_at_the_cap(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub(budget=2500)
    start_paid(sub, operator)
    for _ in range(4):
        operator.data(TOPIC)
    assert all(m.paid for m in rec.take(4))
    assert check_signed(operator.drain(2)) == [1000, 2000]
    assert sub.vouchered(CHANNEL) == 2000 == sub.spent
    assert sub.received_value(CHANNEL) == 4000
    assert sub.budget_exhausted
    (exhausted,) = rec.kinds(PaymentEventKind.BUDGET_EXHAUSTED)
    assert (exhausted.channel_id, exhausted.amount) == (CHANNEL, 3000)
    # A payment request within what was received is still refused: the budget is spent.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 4000, 2000, 3000, TOPIC))
    wait_until(lambda: sub.stats.payment_requests == 1)
    assert operator.drain() == []
    assert sub.vouchered(CHANNEL) == 2000


def test_budget_across_channels(make_sub: Any, operator: Operator) -> None:
    sub, _rec = make_sub(budget=3000)
    start_paid(sub, operator)
    other = "market/hum/1"
    assert sub.subscribe(other, 1) == 1
    operator.notice(sub.address, quote(channel=OTHER_CHANNEL, topic=other))
    wait_until(lambda: sub.quote(other) is not None)
    for topic in (TOPIC, other, TOPIC, other):
        operator.data(topic)
    vouchers = operator.drain(3)
    assert [(v.channel_id, v.cumulative_amount) for v in vouchers] == [
        (CHANNEL, 1000),
        (OTHER_CHANNEL, 1000),
        (CHANNEL, 2000),
    ]
    assert all(recover_voucher_signer(DOMAIN, v) == BUYER.address for v in vouchers)
    assert sub.spent == 3000


def test_payment_request_is_paid_but_never_above_received(
    make_sub: Any, operator: Operator
) -> None:
    sub, rec = make_sub(pay_every=10)
    start_paid(sub, operator)
    for _ in range(3):
        operator.data(TOPIC)
    rec.take(3)
    assert operator.drain() == []  # 3 < pay_every: nothing yet
    # The broker claims more than was delivered: pay only the 3000 received.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 5000, 0, 3000, TOPIC))
    assert check_signed(operator.drain(1)) == [3000]
    # Asking less than already vouchered pays nothing new.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 2000, 3000, 3000, TOPIC))
    wait_until(lambda: sub.stats.payment_requests == 2)
    assert operator.drain() == []
    # The broker says it has only 1000: the latest voucher was lost, send it again.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 3000, 1000, 3000, TOPIC))
    assert check_signed(operator.drain(1)) == [3000]
    requests = rec.kinds(PaymentEventKind.PAYMENT_REQUEST)
    assert [e.amount for e in requests] == [3000, None, None]
    assert all(isinstance(e.notice, PaymentRequest) for e in requests)
    assert sub.vouchered(CHANNEL) == 3000 == sub.spent


def test_requests_that_crossed_a_voucher_get_one_late_copy_and_none_once_receipted(
    make_sub: Any, operator: Operator
) -> None:
    """A request naming less than the voucher just sent may have crossed it on the wire: no
    copy at once; one copy RESEND_AFTER after the voucher went out, however many requests
    came (each answered at once sent 3 here); none if a Receipt confirmed it meanwhile."""
    sub, rec = make_sub(pay_every=3)
    start_paid(sub, operator)
    for _ in range(3):
        operator.data(TOPIC)
    rec.take(3)
    assert check_signed(operator.drain(1, quiet=0.0)) == [3000]
    for _ in range(3):
        operator.notice(sub.address, PaymentRequest(CHANNEL, 3000, 0, 3000, TOPIC))
    wait_until(lambda: sub.stats.payment_requests == 3)
    assert check_signed(operator.drain(1, quiet=RESEND_AFTER + 0.3)) == [3000]
    for _ in range(3):
        operator.data(TOPIC)
    rec.take(3)
    assert check_signed(operator.drain(1, quiet=0.0)) == [6000]
    operator.notice(sub.address, PaymentRequest(CHANNEL, 6000, 3000, 3000, TOPIC))
    operator.notice(sub.address, Receipt(CHANNEL, 6000))
    wait_until(lambda: sub.stats.receipts == 1)
    assert operator.drain(quiet=RESEND_AFTER + 0.3) == []
    assert sub.stats.vouchers_sent == 3
    assert sub.spent == 6000


def test_after_a_restart_the_first_request_pays_in_flight_loss_up_to_the_credit(
    make_sub: Any, operator: Operator
) -> None:
    """Resumed at 7000 after a crash, the broker says it charged 12000: the messages lost in
    flight are paid up to the stated credit (3000), once per connection; later vouchers
    build on it."""
    sub, rec = make_sub(pay_every=10)
    sub.resume_channel(CHANNEL, 7000)
    start_paid(sub, operator)
    operator.notice(sub.address, PaymentRequest(CHANNEL, 12000, 7000, 3000, TOPIC))
    assert check_signed(operator.drain(1)) == [10000]
    # A second request on the same connection pays nothing it did not receive.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 12000, 10000, 3000, TOPIC))
    wait_until(lambda: sub.stats.payment_requests == 2)
    assert operator.drain() == []
    operator.data(TOPIC)
    rec.take(1)
    assert sub.pay_outstanding(CHANNEL) == 1
    assert check_signed(operator.drain(1)) == [11000]
    assert sub.received_value(CHANNEL) == sub.vouchered(CHANNEL) == 11000
    details = [e.detail for e in rec.kinds(PaymentEventKind.PAYMENT_REQUEST)]
    assert "written off 3000" in details[0]
    assert "written off 0" in details[1]


def test_max_write_off_caps_what_a_request_makes_the_buyer_pay_unread(
    make_sub: Any, operator: Operator
) -> None:
    sub, _rec = make_sub(max_write_off=1000)
    sub.resume_channel(CHANNEL, 7000)
    start_paid(sub, operator)
    operator.notice(sub.address, PaymentRequest(CHANNEL, 12000, 7000, 3000, TOPIC))
    assert check_signed(operator.drain(1)) == [8000]


def test_payment_request_for_unknown_channel_pays_nothing(
    make_sub: Any, operator: Operator
) -> None:
    sub, _rec = make_sub()
    sub.connect(5)
    operator.notice(sub.address, PaymentRequest(OTHER_CHANNEL, 5000, 0, 3000, TOPIC))
    wait_until(lambda: sub.stats.payment_requests == 1)
    assert operator.drain() == []
    assert sub.vouchered(OTHER_CHANNEL) == 0


def test_receipts_confirm_and_refusals_are_reported(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub()
    start_paid(sub, operator)
    operator.data(TOPIC)
    rec.take(1)
    assert check_signed(operator.drain(1)) == [1000]
    assert not sub.wait_confirmed(CHANNEL, 1000, 0.05)
    operator.notice(sub.address, Receipt(CHANNEL, 1000))
    assert sub.wait_confirmed(CHANNEL, 1000, 5)
    assert sub.confirmed(CHANNEL) == 1000
    assert not sub.wait_confirmed(CHANNEL, 2000, 0.1)
    refusal = Refusal("not_newer", "already have 1000", CHANNEL, 1000)
    operator.notice(sub.address, refusal)
    wait_until(lambda: sub.stats.refusals == 1)
    (receipt,) = rec.kinds(PaymentEventKind.RECEIPT)
    assert (receipt.channel_id, receipt.amount) == (CHANNEL, 1000)
    (refused,) = rec.kinds(PaymentEventKind.REFUSAL)
    assert refused.notice == refusal
    assert "not_newer" in refused.detail
    assert sub.stats.receipts == 1


def test_one_batched_receipt_confirms_every_voucher_before_it(
    make_sub: Any, operator: Operator
) -> None:
    """The broker answers every N vouchers (or after a delay) with one cumulative Receipt: the
    SDK keeps paying on its schedule without waiting for receipts, and one receipt confirms
    everything up to its amount."""
    sub, rec = make_sub()
    start_paid(sub, operator)
    for _ in range(5):
        operator.data(TOPIC)
    rec.take(5)
    assert check_signed(operator.drain(5)) == [1000, 2000, 3000, 4000, 5000]
    assert sub.confirmed(CHANNEL) == 0  # no receipt yet: nothing stalls
    operator.notice(sub.address, Receipt(CHANNEL, 5000))
    assert sub.wait_confirmed(CHANNEL, 5000, 5)
    assert sub.wait_confirmed(CHANNEL, 3000, 0)
    assert sub.stats.receipts == 1
    assert sub.stats.vouchers_sent == 5
    operator.data(TOPIC)
    rec.take(1)
    assert check_signed(operator.drain(1)) == [6000]
    assert operator.drain() == []  # nothing re-sent for want of a receipt


def test_unquoted_topics_are_free(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub()
    start_paid(sub, operator)
    assert sub.subscribe("public/news", 0) == 0
    operator.data("public/news", b"hello")
    (free,) = rec.take(1)
    assert free == ReceivedMessage("public/news", b"hello", 0, False, False, 0, None)
    operator.data(TOPIC)
    (paid,) = rec.take(1)
    assert paid.paid
    assert check_signed(operator.drain(1)) == [1000]
    assert sub.stats.paid_messages == 1
    assert sub.stats.messages == 2


def test_zero_price_quote_is_free(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub()
    start_paid(sub, operator, quote(price=0))
    operator.data(TOPIC)
    (msg,) = rec.take(1)
    assert not msg.paid
    assert operator.drain() == []


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"v": 1, "type": "receipt", "channel": "0x12", "amount": "1"}', b"[]"],
)
def test_malformed_notice_is_reported_without_crashing(
    make_sub: Any, operator: Operator, payload: bytes
) -> None:
    sub, rec = make_sub()
    sub.connect(5)
    operator.raw_notice(sub.address, payload)
    wait_until(lambda: len(rec.errors) == 1)
    assert isinstance(rec.errors[0], WireError)
    assert sub.stats.bad_notices == 1
    # The loop thread survived: payment still works.
    assert sub.subscribe(TOPIC, 1) == 1
    operator.notice(sub.address, quote())
    wait_until(lambda: sub.quote(TOPIC) is not None)
    operator.data(TOPIC)
    rec.take(1)
    assert check_signed(operator.drain(1)) == [1000]


def test_callback_exception_does_not_kill_the_loop(make_sub: Any, operator: Operator) -> None:
    sub, _rec = make_sub()
    seen: list[bytes] = []

    def explode(_s: Subscriber, message: ReceivedMessage) -> None:
        seen.append(message.payload)
        raise RuntimeError("user bug")

    start_paid(sub, operator)
    sub.on_message = explode
    operator.data(TOPIC, b"a")
    operator.data(TOPIC, b"b")
    wait_until(lambda: seen == [b"a", b"b"])
    assert check_signed(operator.drain(2)) == [1000, 2000]
    assert sub.connected


def test_resume_channel_builds_on_what_was_paid(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub(budget=1000)
    sub.resume_channel(CHANNEL, 7000)
    start_paid(sub, operator)
    operator.data(TOPIC)
    rec.take(1)
    assert check_signed(operator.drain(1)) == [8000]
    assert sub.spent == 1000
    with pytest.raises(ConfigError):
        sub.resume_channel(CHANNEL, 1)


# --------------------------------------------------------------------------- connection


def test_connects_with_address_and_a_fresh_token_each_time(make_sub: Any) -> None:
    sub, _rec = make_sub(client_id="buyer-fixed-id")
    sub.connect(5)
    sub.disconnect()
    sub.connect(5)
    mine = [s for s in SEEN if s[0] == "buyer-fixed-id"]
    assert len(mine) == 2
    assert {user for _, user, _ in mine} == {BUYER.address}
    first, second = (password for _, _, password in mine)
    assert first != second
    assert parse_connect_token(first).nonce != parse_connect_token(second).nonce
    verifier = ConnectTokenVerifier(CHAIN_ID, OPERATOR)
    now = int(time.time())
    for _, user, password in mine:
        assert verifier.verify(user, "buyer-fixed-id", password, now) == BUYER.address
    assert sub.tokens_issued == 2


def test_automatic_reconnect_uses_a_fresh_token_and_renews_subscriptions(
    broker: StockBroker, make_sub: Any
) -> None:
    sub, rec = make_sub()
    start = len(SEEN)
    sub.connect(5)
    assert sub.subscribe(TOPIC, 1) == 1
    assert sub.subscribe("revoked/x", 0) == 0
    broker.stop()
    DENIED_PREFIXES.add("revoked/")  # renewing this one will be refused
    wait_until(lambda: any(not d.requested and d.reconnecting for d in rec.disconnects))
    broker.start()  # same port; paho retries after its 1 s back-off
    wait_until(lambda: sub.tokens_issued >= 2 and sub.connected, within=15)
    wait_until(lambda: bool(rec.errors))
    assert [(type(e), getattr(e, "topic_filter", None)) for e in rec.errors] == [
        (SubscriptionRefusedError, "revoked/x")
    ]
    passwords = [password for _, _, password in SEEN[start:]]
    assert len(passwords) >= 2
    assert len(set(passwords)) == len(passwords)
    # The new (clean) session got the others back: notices and data flow again.
    op = Operator(broker.port)
    try:
        op.notice(sub.address, quote())
        wait_until(lambda: sub.quote(TOPIC) is not None)
        op.data(TOPIC)
        assert rec.take(1)[0].paid
        assert check_signed(op.drain(1)) == [1000]
    finally:
        op.close()


def test_after_a_reconnect_the_first_request_pays_in_flight_loss_up_to_the_credit(
    broker: StockBroker, make_sub: Any, operator: Operator
) -> None:
    sub, rec = make_sub(pay_every=10)
    start_paid(sub, operator)
    operator.data(TOPIC)
    rec.take(1)
    # Before the connection drops, a request above what was received pays nothing more.
    operator.notice(sub.address, PaymentRequest(CHANNEL, 3000, 0, 3000, TOPIC))
    assert check_signed(operator.drain(1)) == [1000]
    # Confirmed, so the reconnect re-sends nothing (an unconfirmed 1000 would go again).
    operator.notice(sub.address, Receipt(CHANNEL, 1000))
    wait_until(lambda: sub.stats.receipts == 1)
    operator.close()
    broker.stop()
    wait_until(lambda: any(not d.requested and d.reconnecting for d in rec.disconnects))
    BUYER_GATE.clear()  # the operator subscribes before the buyer is back: it sees everything
    broker.start()
    op = Operator(broker.port)
    BUYER_GATE.set()
    wait_until(lambda: sub.tokens_issued >= 2 and sub.connected, within=15)
    try:
        op.notice(sub.address, PaymentRequest(CHANNEL, 3000, 1000, 3000, TOPIC))
        assert check_signed(op.drain(1)) == [3000]  # the 2 lost with the connection
    finally:
        op.close()


def test_refused_connect_raises_with_the_connack_code(make_sub: Any) -> None:
    sub, _rec = make_sub()
    REFUSED_USERS.add(BUYER.address)
    with pytest.raises(BrokerRefusedError) as info:
        sub.connect(5)
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, BrokerConnectionError)
    assert info.value.return_code in (4, 5)
    assert not sub.connected
    # Refused once means stopped: no retry storm with more tokens.
    time.sleep(1.5)
    assert sub.tokens_issued == 1


def test_unreachable_broker_raises_connection_error(broker: StockBroker) -> None:
    port = broker.port
    broker.stop()
    sub = Subscriber(
        BUYER,
        host="127.0.0.1",
        port=port,
        broker=OPERATOR,
        chain_id=CHAIN_ID,
        channels_contract=CONTRACT,
    )
    with pytest.raises(BrokerConnectionError):
        sub.connect(2)


def test_refused_subscription_raises_and_stays_connected(make_sub: Any, operator: Operator) -> None:
    sub, rec = make_sub()
    sub.connect(5)
    with pytest.raises(SubscriptionRefusedError) as info:
        sub.subscribe("denied/secret", 1)
    assert isinstance(info.value, PermissionError)
    assert info.value.topic_filter == "denied/secret"
    assert sub.connected
    assert sub.subscribe("open/data", 0) == 0
    operator.data("open/data", b"x")
    assert rec.take(1)[0].payload == b"x"


def test_context_manager_connects_and_disconnects(make_sub: Any) -> None:
    sub, rec = make_sub()
    with sub as entered:
        assert entered is sub
        assert sub.connected
    assert not sub.connected
    wait_until(lambda: bool(rec.disconnects))
    assert rec.disconnects[-1].requested
    assert not rec.disconnects[-1].reconnecting


def test_default_client_id_and_key_bytes() -> None:
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1883,
        "broker": OPERATOR,
        "chain_id": CHAIN_ID,
        "channels_contract": CONTRACT,
    }
    a = Subscriber(bytes(BUYER.key), **kwargs)
    b = Subscriber(BUYER, **kwargs)
    assert a.address == b.address == BUYER.address
    assert a.client_id != b.client_id
    assert a.client_id.startswith("bsm-" + BUYER.address[2:10].lower())
    assert len(a.client_id) <= 23
    assert a.notice_topic == f"blendsm/ctl/{BUYER.address.lower()}/notice"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("budget", -1),
        ("pay_every", 0),
        ("callback_api_version", 2),
        ("port", 0),
        ("channels_contract", "0x1234"),
        ("client_id", ""),
        ("account", b"\x01" * 31),
        ("reconnect_max_delay", -1),
        ("reconnect_max_delay", "1"),
        ("reconnect_max_delay", float("nan")),
    ],
)
def test_bad_settings_are_config_errors(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 1883,
        "broker": OPERATOR,
        "chain_id": CHAIN_ID,
        "channels_contract": CONTRACT,
        "callback_api_version": SubscriberCallbackAPI.VERSION1,
        field: value,
    }
    account = kwargs.pop("account", BUYER)
    with pytest.raises(ConfigError):
        Subscriber(account, **kwargs)


def test_control_filters_are_refused(make_sub: Any) -> None:
    sub, _rec = make_sub()
    with pytest.raises(ConfigError):
        sub.subscribe("blendsm/ctl/#")


# --------------------------------------------------------------------------- chain


async def test_chain_helpers_open_top_up_close_withdraw(
    chain: Any, mp: Callable[[str], Marketplace]
) -> None:
    buyer = chain.accounts["buyer"]
    seller = chain.addr("seller")
    operator = chain.addr("operator")
    market = mp("buyer")
    sub = Subscriber(
        buyer,
        host="127.0.0.1",
        port=1883,
        broker=operator,
        chain_id=chain.deployment.chain_id,
        channels_contract=market.channels.address,
    )
    channel_id = await sub.open_channel(market, seller, 10_000, fee_bps=100)
    info = await market.channels.channel(channel_id)
    assert info is not None
    assert (info.payer, info.payee, info.operator, info.token) == (
        buyer.address,
        seller,
        operator,
        None,
    )
    assert (info.deposit, info.fee_bps) == (10_000, 100)
    await sub.top_up(market, channel_id, 5_000)
    info = await market.channels.channel(channel_id)
    assert info is not None
    assert info.deposit == 15_000
    # A voucher the subscriber signs is what the contract computes.
    lane = sub.broker  # a broker without broker_key: the operator's own lane
    assert await market.channels.voucher_digest(channel_id, lane, 1234) == sub.domain.digest(
        channel_id, lane, 1234
    )
    closing = await sub.close_channel(market, channel_id)
    chain.time_travel(closing.closes_at - chain.now() + 1)
    before = chain.balance(None, buyer.address)
    settled = await sub.withdraw(market, channel_id)
    assert settled.refund == 15_000
    assert chain.balance(None, buyer.address) > before + 15_000 - 10**16  # refund minus gas
    info = await market.channels.channel(channel_id)
    assert info is not None
    assert info.settled
    # A marketplace signing as someone else is refused before any transaction.
    with pytest.raises(ConfigError):
        await sub.open_channel(mp("seller"), seller, 1)


# --------------------------------------------------------------------------- recovery

OTHER_TOPIC = "market/other"


def test_back_soon_after_a_broker_restart(broker: StockBroker, make_sub: Any) -> None:
    """paho's own backoff (1, 2, 4 ... 120 s) kept buyers away 4 s from a broker that was
    back 3.5 s after going away; capped at ``reconnect_max_delay`` (1 s) with full jitter, the
    next attempt comes within about 1 s of the broker listening (generous bound: loaded CI)."""
    sub, rec = make_sub()
    sub.connect(5)
    broker.stop()
    wait_until(lambda: any(not d.requested and d.reconnecting for d in rec.disconnects))
    time.sleep(3.5)
    broker.start()
    listening = time.monotonic()
    wait_until(lambda: sub.connected, within=15)
    back = time.monotonic() - listening
    print(f"\nsubscriber back {back:.2f} s after the broker listened again")
    assert back < 3.0


def test_after_a_reconnect_the_latest_unconfirmed_voucher_is_sent_again(
    broker: StockBroker, make_sub: Any, operator: Operator
) -> None:
    """Receipts are QoS 0 and batched: the one for the last vouchers before a drop may never
    come. After a reconnect the SDK re-sends the latest voucher of each channel not confirmed
    up to it (the broker answers an equal one with a Receipt); a confirmed channel sends
    nothing."""
    sub, rec = make_sub()
    start_paid(sub, operator)
    operator.notice(sub.address, quote(channel=OTHER_CHANNEL, topic=OTHER_TOPIC))
    assert sub.subscribe(OTHER_TOPIC, 1) == 1
    wait_until(lambda: sub.quote(OTHER_TOPIC) is not None)
    for topic in (TOPIC, TOPIC, OTHER_TOPIC):
        operator.data(topic)
    rec.take(3)
    sent = operator.drain(3)
    assert sorted((v.channel_id, v.cumulative_amount) for v in sent) == sorted(
        [(CHANNEL, 1000), (CHANNEL, 2000), (OTHER_CHANNEL, 1000)]
    )
    operator.notice(sub.address, Receipt(CHANNEL, 1000))  # behind the latest (2000)
    operator.notice(sub.address, Receipt(OTHER_CHANNEL, 1000))  # up to date
    wait_until(lambda: sub.stats.receipts == 2)
    operator.close()
    broker.stop()
    wait_until(lambda: any(not d.requested and d.reconnecting for d in rec.disconnects))
    BUYER_GATE.clear()  # the operator subscribes before the buyer is back
    broker.start()
    op = Operator(broker.port)
    BUYER_GATE.set()
    try:
        wait_until(lambda: sub.tokens_issued >= 2 and sub.connected, within=15)
        again = op.drain(1, quiet=0.5)
        assert [(v.channel_id, v.cumulative_amount) for v in again] == [(CHANNEL, 2000)]
        assert check_signed(again) == [2000]
        assert sub.stats.vouchers_sent == 4
        assert sub.spent == 3000  # a re-sent voucher costs nothing new
        op.notice(sub.address, Receipt(CHANNEL, 2000))
        assert sub.wait_confirmed(CHANNEL, 2000, 5)
    finally:
        op.close()


# --------------------------------------------------------------------------------- lanes

LANE_A = "0x" + "a1" * 20  # TEST ONLY broker keys: any addresses
LANE_B = "0x" + "b2" * 20


def test_one_counter_per_lane_and_never_over_the_deposit(make_sub: Any, operator: Operator) -> None:
    """Issue 14: the quotes name the broker's lane; the SDK keeps one cumulative counter per
    (channel, lane), so moving from broker A to broker B starts B's lane at 0, and it never
    signs lanes that together exceed the deposit it knows."""
    sub, rec = make_sub()
    sub.set_deposit(CHANNEL, 3 * PRICE)
    lane_a, lane_b = (to_checksum_address(x) for x in (LANE_A, LANE_B))
    q_a = Quote(TOPIC, SELLER, CHANNEL, PRICE, credit=3 * PRICE, charged=0, paid=0, lane=lane_a)
    start_paid(sub, operator, q_a)
    for _ in range(2):
        operator.data(TOPIC)
    rec.take(2)
    got = operator.drain(2)
    assert check_signed(got) == [PRICE, 2 * PRICE]
    assert {v.lane for v in got} == {lane_a}
    q_b = Quote(TOPIC, SELLER, CHANNEL, PRICE, credit=3 * PRICE, charged=0, paid=0, lane=lane_b)
    operator.notice(sub.address, q_b)
    wait_until(lambda: sub.quote(TOPIC) == q_b)
    operator.data(TOPIC)
    rec.take(1)
    (first_b,) = operator.drain(1)
    assert (first_b.lane, first_b.cumulative_amount) == (lane_b, PRICE)  # B starts at 0
    operator.data(TOPIC)  # lane B at 2 * PRICE would make 4 * PRICE over both: not signed
    rec.take(1)
    wait_until(lambda: len(rec.kinds(PaymentEventKind.DEPOSIT_EXHAUSTED)) == 1)
    assert operator.drain() == []
    assert sub.vouchered(CHANNEL, lane_a) == 2 * PRICE
    assert sub.vouchered(CHANNEL, lane_b) == PRICE
    assert sub.vouchered(CHANNEL) == 3 * PRICE
    operator.notice(sub.address, Receipt(CHANNEL, PRICE, lane_b))
    assert sub.wait_confirmed(CHANNEL, PRICE, 5, lane_b)
    assert sub.confirmed(CHANNEL, lane_a) == 0
