"""Per-channel accounting of paid deliveries: the credit gate and the meter.

Why in memory and synchronous: the gate runs once per paid delivery on the broker's event
loop, so it must be a few dict reads and integer additions, never I/O. The money rules:

* A delivery is *reserved* before its PUBLISH is written and *committed* (charged) only
  after the write succeeded; a failed or skipped write *releases* the reservation. Nobody
  is charged for a message that was not sent.
* A reservation is granted only while ``charged + reserved + price - paid <= credit`` and
  ``charged + reserved + price <= deposit`` (a voucher can never pay beyond the deposit).
* ``paid`` is the latest voucher amount that is already durable in the voucher store. A
  voucher above ``charged`` (a prepayment) is credit toward later deliveries, never
  delivered value: ``charged`` only grows by committed deliveries.

After a restart ``charged`` starts at the delivered value the voucher store recorded
(:meth:`Meter.load_delivered`), never at ``paid``: a prepayment not delivered before the
restart stays credit. The meter hands the values that changed since the last write to the
store (:meth:`Meter.unsaved_delivered`) with each voucher batch, periodically and at stop, not
per delivery; after a kill the stored value lags by at most the deliveries committed since
the last write, so the broker claims less, never more, than it delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from blendsm.contracts import ChannelInfo, TopicInfo

__all__ = ["Account", "ChannelSource", "Charge", "Meter", "Reservation"]


class ChannelSource(Protocol):
    """Where channels come from (the chain view)."""

    def channels_of(self, payer: str) -> list[ChannelInfo]: ...


@dataclass(slots=True, eq=False)
class Account:
    """The broker's books for one channel it meters."""

    channel_id: bytes
    payer: str
    """Checksum address of the subscriber paying on this channel."""
    seller: str
    token: str | None
    deposit: int
    usable: bool
    """Open, not closing, not settled: deliveries may be charged to it."""
    charged: int = 0
    reserved: int = 0
    paid: int = 0
    delivered: int = 0
    denied_no_credit: int = 0
    """Deliveries to this channel's payer not sent (nor charged): its credit was used up."""
    waiters: list[object] = field(default_factory=list)
    """Sessions whose offline replay paused on this account's credit, and the credit holds
    (:class:`~blendsm.broker._credit_hold.CreditHold`) of live deliveries waiting on it."""

    @property
    def unpaid(self) -> int:
        return self.charged - self.paid


@dataclass(slots=True, eq=False)
class Charge:
    """One reserved delivery, settled exactly once (commit or release)."""

    account: Account
    price: int
    topic: str
    done: bool = False


class Reservation:
    """Why a reservation was refused (the gate's non-charge outcomes)."""

    NO_CHANNEL: Final = "no usable channel"
    NO_CREDIT: Final = "credit used up"
    NO_DEPOSIT: Final = "deposit used up"


class Meter:
    """Accounts by channel, chosen per (subscriber, seller, token) from the chain view.

    ``operator`` is this broker's operator: only channels naming it are metered here (the
    contract pays the operator fee to whoever the channel names). ``credit_messages`` is the
    credit in messages of the topic being delivered.
    """

    def __init__(self, operator: str, credit_messages: int) -> None:
        self.operator = operator.lower()
        self.credit_messages = credit_messages
        self.accounts: dict[bytes, Account] = {}
        self._choice: dict[tuple[str, str, str | None], Account | None] = {}
        self._durable_paid: dict[bytes, int] = {}
        self._restored: dict[bytes, int] = {}  # charged seeds from the store at start-up
        self._unsaved: dict[bytes, Account] = {}  # charged rose since the store last got it
        self.delivered = 0
        self.denied_no_credit = 0
        self.on_delivered: Callable[[str], None] | None = None
        """Told the topic of every market delivery: committed charges here, free (price-0)
        ones by the gate. The anchorer's "sold" signal: what was delivered gets anchored."""
        self.lane_claimed: Callable[[bytes], int] | None = None
        """What this broker's lane claimed on a channel (the chain view's): lanes share the
        deposit, so this lane can deliver up to ``deposit - (claimed - lane_claimed)``.
        None: one lane per channel, everything claimed is this lane's."""

    def _lane_deposit(self, info: ChannelInfo) -> int:
        """The part of the deposit this broker's lane can still be paid (issue 14)."""
        if self.lane_claimed is None:
            return info.deposit
        return info.deposit - max(0, info.claimed - self.lane_claimed(info.channel_id))

    # --- chain state ---------------------------------------------------------------

    def load_paid(self, paid: Iterable[tuple[bytes, int]]) -> None:
        """Seed the durable voucher amounts read from the store at start-up (credit, never
        delivered value: see :meth:`load_delivered`)."""
        for channel_id, amount in paid:
            self._durable_paid[channel_id] = amount
            account = self.accounts.get(channel_id)
            if account is not None:
                account.paid = max(account.paid, amount)

    def awaited(self, channel_ids: Iterable[bytes]) -> bool:
        """Whether deliveries held for credit wait on one of these channels (a voucher of
        one of them releases them once committed)."""
        accounts = self.accounts
        return any((a := accounts.get(cid)) is not None and bool(a.waiters) for cid in channel_ids)

    def load_delivered(self, delivered: Iterable[tuple[bytes, int]]) -> None:
        """Seed ``charged`` with the delivered values read from the store at start-up."""
        for channel_id, charged in delivered:
            self._restored[channel_id] = charged
            account = self.accounts.get(channel_id)
            if account is not None:
                account.charged = max(account.charged, charged)

    def unsaved_delivered(self, *, everything: bool = False) -> list[tuple[bytes, int]]:
        """``(channel_id, charged)`` of every channel charged since the last call (of every
        charged channel with ``everything``, for the last write at stop), for the store;
        hand them back with :meth:`delivered_not_saved` if the write failed."""
        unsaved, self._unsaved = self._unsaved, {}
        if everything:
            unsaved = {cid: a for cid, a in self.accounts.items() if a.charged > 0}
        return [(channel_id, account.charged) for channel_id, account in unsaved.items()]

    def delivered_not_saved(self, values: Iterable[tuple[bytes, int]]) -> None:
        """The store did not take ``values``: offer them again with the next write."""
        for channel_id, _ in values:
            account = self.accounts.get(channel_id)
            if account is not None:
                self._unsaved[channel_id] = account

    def select(self, payer_key: str, topic: TopicInfo, view: ChannelSource) -> Account | None:
        """The account a delivery of ``topic`` to ``payer_key`` is charged to (cached).

        The newest usable channel from the payer to the topic's seller, naming this operator,
        in the topic's token; ``view.channels_of`` is read only on a cache miss."""
        key = (payer_key, topic.seller, topic.token)
        try:
            return self._choice[key]
        except KeyError:
            pass
        chosen: Account | None = None
        for info in reversed(view.channels_of(payer_key)):
            if (
                info.payee == topic.seller
                and info.token == topic.token
                and info.operator is not None
                and info.operator.lower() == self.operator
                and not info.settled
                and info.closes_at is None
            ):
                chosen = self._account(info)
                break
        self._choice[key] = chosen
        return chosen

    def _account(self, info: ChannelInfo) -> Account:
        account = self.accounts.get(info.channel_id)
        if account is None:
            account = Account(
                channel_id=info.channel_id,
                payer=info.payer,
                seller=info.payee,
                token=info.token,
                deposit=self._lane_deposit(info),
                usable=not info.settled and info.closes_at is None,
                charged=self._restored.get(info.channel_id, 0),
                paid=self._durable_paid.get(info.channel_id, 0),
            )
            self.accounts[info.channel_id] = account
        return account

    def channel_changed(self, info: ChannelInfo) -> None:
        """A channel event arrived: refresh deposit/usability and forget cached choices."""
        account = self.accounts.get(info.channel_id)
        if account is not None:
            account.deposit = self._lane_deposit(info)
            account.usable = not info.settled and info.closes_at is None
        payer = info.payer.lower()
        for key in [k for k in self._choice if k[0] == payer]:
            del self._choice[key]

    def forget_choices(self) -> None:
        """Drop every cached channel choice (e.g. after a topic's token or seller changed)."""
        self._choice.clear()

    # --- hot path --------------------------------------------------------------------

    def reserve(self, account: Account, price: int, topic: str) -> Charge | str:
        """A :class:`Charge` if the delivery fits credit and deposit, else the reason."""
        if not account.usable:
            return Reservation.NO_CHANNEL
        owed = account.charged + account.reserved + price
        if owed > account.deposit:
            return Reservation.NO_DEPOSIT
        if owed - account.paid > self.credit_messages * price:
            self.denied_no_credit += 1
            account.denied_no_credit += 1
            return Reservation.NO_CREDIT
        account.reserved += price
        return Charge(account, price, topic)

    def commit(self, charge: Charge) -> None:
        """The PUBLISH was written: charge it."""
        if charge.done:
            return
        charge.done = True
        account = charge.account
        account.reserved -= charge.price
        account.charged += charge.price
        account.delivered += 1
        self._unsaved[account.channel_id] = account  # written later, off the hot path
        self.delivered += 1
        if self.on_delivered is not None:
            self.on_delivered(charge.topic)

    def release(self, charge: Charge) -> None:
        """The PUBLISH was not written: forget the reservation."""
        if charge.done:
            return
        charge.done = True
        charge.account.reserved -= charge.price

    def held(self, account: Account | None) -> None:
        """A delivery :meth:`reserve` refused for credit is held for a voucher instead of
        dropped (:mod:`~blendsm.broker._credit_hold`): not a denial, uncounted."""
        self.denied_no_credit -= 1
        if account is not None:
            account.denied_no_credit -= 1

    def dropped_for_credit(self, account: Account | None) -> None:
        """A held delivery was dropped (hold bound or age): a denial for credit after all."""
        self.denied_no_credit += 1
        if account is not None:
            account.denied_no_credit += 1

    def credit_of(self, price: int) -> int:
        return self.credit_messages * price

    # --- vouchers --------------------------------------------------------------------

    def paid_up_to(self, channel_id: bytes, amount: int) -> Account | None:
        """A durable voucher for ``amount`` was stored: raise ``paid`` (monotonic)."""
        if amount > self._durable_paid.get(channel_id, 0):
            self._durable_paid[channel_id] = amount
        account = self.accounts.get(channel_id)
        if account is not None and amount > account.paid:
            account.paid = amount
        return account

    def paid_of(self, channel_id: bytes) -> int:
        return self._durable_paid.get(channel_id, 0)

    def delivered_value(self, channel_id: bytes) -> int:
        """What the channel was charged for deliveries (the restart seed while no delivery
        was metered in this run): a claim must never be above it."""
        account = self.accounts.get(channel_id)
        if account is not None:
            return account.charged
        return self._restored.get(channel_id, 0)
