"""The meter's money rules under random interleavings of reserve/commit/release/voucher."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from blendsm.broker._meter import Charge, Meter, Reservation
from blendsm.contracts import ChannelInfo, Policy, TopicInfo

OPERATOR = "0x" + "0a" * 20
SELLER = "0x" + "5e" * 20
BUYER = "0x" + "b0" * 20


def _topic(price: int) -> TopicInfo:
    return TopicInfo(
        topic_id=b"\x01" * 32,
        name="t",
        seller=SELLER,
        token=None,
        price=price,
        policy=Policy.OPEN,
        min_rating_x100=0,
        paused=False,
    )


def _channel(
    cid: int, deposit: int, *, operator: str | None = OPERATOR, closes_at: int | None = None
) -> ChannelInfo:
    return ChannelInfo(
        channel_id=bytes([cid]) * 32,
        payer=BUYER,
        payee=SELLER,
        operator=operator,
        token=None,
        deposit=deposit,
        claimed=0,
        fee_bps=0,
        closes_at=closes_at,
        settled=False,
    )


class _View:
    def __init__(self, channels: list[ChannelInfo]) -> None:
        self.channels = channels
        self.reads = 0

    def channels_of(self, payer: str) -> list[ChannelInfo]:
        self.reads += 1
        return self.channels


def test_select_picks_the_newest_usable_channel_for_this_operator_and_caches_it() -> None:
    view = _View(
        [
            _channel(1, 100),
            _channel(2, 100, operator="0x" + "ff" * 20),  # another broker's channel
            _channel(3, 100, closes_at=5),  # closing
        ]
    )
    meter = Meter(OPERATOR, credit_messages=2)
    account = meter.select(BUYER.lower(), _topic(10), view)
    assert account is not None
    assert account.channel_id == bytes([1]) * 32
    assert meter.select(BUYER.lower(), _topic(10), view) is account
    assert view.reads == 1  # cached on the hot path
    view.channels.append(_channel(4, 100))
    meter.channel_changed(view.channels[-1])  # an event invalidates the choice
    newer = meter.select(BUYER.lower(), _topic(10), view)
    assert newer is not None
    assert newer.channel_id == bytes([4]) * 32


def test_restart_starts_charged_at_the_stored_delivered_value_not_paid() -> None:
    meter = Meter(OPERATOR, credit_messages=2)
    meter.load_paid([(bytes([1]) * 32, 70)])
    meter.load_delivered([(bytes([1]) * 32, 50)])  # 2 messages' worth prepaid, undelivered
    account = meter.select(BUYER.lower(), _topic(10), _View([_channel(1, 100)]))
    assert account is not None
    assert (account.charged, account.paid) == (50, 70)
    # the 2 prepaid messages and 2 more of credit fit, a fifth does not
    for _ in range(4):
        assert isinstance(meter.reserve(account, 10, "t"), Charge)
    assert meter.reserve(account, 10, "t") == Reservation.NO_CREDIT


def test_committed_deliveries_are_handed_to_the_store_once_and_again_after_a_failure() -> None:
    meter = Meter(OPERATOR, credit_messages=5)
    account = meter.select(BUYER.lower(), _topic(10), _View([_channel(1, 1_000)]))
    assert account is not None
    assert meter.unsaved_delivered() == []
    for _ in range(3):
        charge = meter.reserve(account, 10, "t")
        assert isinstance(charge, Charge)
        meter.commit(charge)
    released = meter.reserve(account, 10, "t")
    assert isinstance(released, Charge)
    meter.release(released)
    taken = meter.unsaved_delivered()
    assert taken == [(bytes([1]) * 32, 30)]
    assert meter.unsaved_delivered() == []  # nothing new since
    meter.delivered_not_saved(taken)  # the write failed: offered again, at the current value
    charge = meter.reserve(account, 10, "t")
    assert isinstance(charge, Charge)
    meter.commit(charge)
    assert meter.unsaved_delivered() == [(bytes([1]) * 32, 40)]
    assert meter.unsaved_delivered(everything=True) == [(bytes([1]) * 32, 40)]


def test_a_prepaid_voucher_is_credit_never_delivered_value() -> None:
    meter = Meter(OPERATOR, credit_messages=2)
    channel_id = bytes([1]) * 32
    meter.paid_up_to(channel_id, 100)  # accepted before the first delivery of this run
    account = meter.select(BUYER.lower(), _topic(10), _View([_channel(1, 1_000)]))
    assert account is not None
    assert (account.charged, account.paid) == (0, 100)
    assert meter.delivered_value(channel_id) == 0
    for _ in range(12):  # the 10 prepaid messages plus the credit of 2
        charge = meter.reserve(account, 10, "t")
        assert isinstance(charge, Charge)
        meter.commit(charge)
    assert meter.reserve(account, 10, "t") == Reservation.NO_CREDIT
    assert (account.charged, account.delivered) == (120, 12)
    assert meter.delivered_value(channel_id) == 120


def test_delivered_value_before_any_delivery_is_the_restart_seed() -> None:
    meter = Meter(OPERATOR, credit_messages=2)
    meter.load_paid([(bytes([1]) * 32, 70), (bytes([3]) * 32, 90)])
    meter.load_delivered([(bytes([1]) * 32, 40)])
    meter.paid_up_to(bytes([2]) * 32, 50)
    assert meter.delivered_value(bytes([1]) * 32) == 40
    assert meter.delivered_value(bytes([2]) * 32) == 0
    assert meter.delivered_value(bytes([3]) * 32) == 0  # a voucher is never delivered value


@settings(max_examples=200, deadline=None)
@given(
    price=st.integers(1, 50),
    credit=st.integers(1, 6),
    deposit=st.integers(0, 2_000),
    ops=st.lists(st.tuples(st.sampled_from("rcxvp"), st.integers(0, 10_000)), max_size=120),
)
def test_unpaid_never_exceeds_credit_and_charges_never_exceed_the_deposit(
    price: int, credit: int, deposit: int, ops: list[tuple[str, int]]
) -> None:
    meter = Meter(OPERATOR, credit_messages=credit)
    account = meter.select(BUYER.lower(), _topic(price), _View([_channel(1, deposit)]))
    assert account is not None
    pending: list[Charge] = []
    committed = 0
    for op, value in ops:
        if op == "r":
            result: Any = meter.reserve(account, price, "t")
            if isinstance(result, Charge):
                pending.append(result)
        elif op == "c" and pending:
            meter.commit(pending.pop(value % len(pending)))
            committed += 1
        elif op == "x" and pending:
            meter.release(pending.pop(value % len(pending)))
        elif op == "v":  # a voucher for at most what was charged (an honest payer)
            meter.paid_up_to(account.channel_id, min(value, account.charged))
        elif op == "p" and pending:  # commit twice: the second is ignored
            charge = pending.pop(value % len(pending))
            meter.commit(charge)
            meter.commit(charge)
            meter.release(charge)
            committed += 1
        assert account.charged + account.reserved <= deposit
        assert account.charged + account.reserved - account.paid <= credit * price
        assert account.reserved == price * len(pending)
        assert account.charged == committed * price
        assert account.delivered == committed
