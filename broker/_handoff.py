"""Hand-off of a stored market message to the fan-out: acknowledged only once handed on,
delivered once per broker run, and a re-send of one never handed on delivered, not dropped.

Why: a device's QoS 1 PUBLISH was stored (its leaf durable), acknowledged, and only then put
on amqtt's broadcast queue. A broker killed in between had acknowledged a message no
subscriber ever got, and when the PUBACK had not gone out, the device's re-send after the
restart was dropped as a duplicate of the stored leaf. Now (see docs/integrity.md):

* every admitted market message carries a :class:`Ticket` on its payload; the fan-out
  claims it before delivering (:func:`claim`): a leaf is handed on at most once per run, so
  two copies of one message in the pipeline (the first and a device's re-send) are never both
  delivered or charged;
* right after the fan-out wrote the batch holding it (:func:`handed`), in the same step, the
  QoS 1 PUBACK is written, the ticket resolves and the leaf is marked handed in the leaf
  store (lazily: after its PUBACK no honest device re-sends a message);
* a duplicate whose leaf is stored but was never handed on (not claimed in this run, not
  marked in the store) is let through once (:meth:`HandOff.resend_deliverable`), uncharged
  (:func:`uncharged`: it may have reached its subscribers before the crash).

What a kill can still do: a PUBACK written but lost with the connection, while the leaf's
mark is not yet durable (the next commit, at most ``MARK_LINGER`` later), makes the device
re-send a message the subscribers already got, and it is delivered again; between the
store's commit and the fan-out a QoS 0 message (never re-sent) or a QoS 2 one (PUBREC already
sent) is lost for live subscribers. Leaves left unmarked are counted at the next start
(``blendsm_leaves_unhanded_at_start_total``, an upper bound: marks lag) with a log line, and
anchored as always.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from blendsm.broker._access import Verdict
from blendsm.broker._meter import Charge, Meter

if TYPE_CHECKING:
    from blendsm.broker._leaf_store import AsyncLeafStore

__all__ = ["CLAIMED_CAP", "HandOff", "Ticket", "claim", "handed", "is_resend", "uncharged"]

CLAIMED_CAP: Final = 65_536
"""Leaves remembered as claimed in memory (the store's mark covers older ones, durable within
``MARK_LINGER``): about 6 MB."""


class Ticket:
    """One admitted market message on its way to the fan-out."""

    __slots__ = ("ack", "done", "leaf", "owner", "resend")

    def __init__(self, owner: HandOff, leaf: bytes, resend: bool = False) -> None:
        self.owner = owner
        self.leaf = leaf
        self.resend = resend
        """A device's re-send of a leaf stored in an earlier run and never recorded as handed
        on: its subscribers may have got it already (the mark lags the write), so it is
        delivered uncharged, as a redelivery (:func:`uncharged`)."""
        self.ack: Callable[[], None] | None = None
        """Writes the QoS 1 PUBACK that waits for the hand-off (set by the handler)."""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved once the fan-out wrote the batch holding this message."""


class HandOff:
    """Which leaves were handed to the fan-out in this run (bounded), backed by the marks
    in the leaf store for older ones and earlier runs."""

    __slots__ = ("_claimed", "store")

    def __init__(self, store: AsyncLeafStore | None) -> None:
        self.store = store
        self._claimed: OrderedDict[bytes, None] = OrderedDict()

    def ticket(self, leaf: bytes, *, resend: bool = False) -> Ticket:
        return Ticket(self, leaf, resend)

    def _claim(self, leaf: bytes) -> bool:
        if leaf in self._claimed:
            return False
        self._claimed[leaf] = None
        if len(self._claimed) > CLAIMED_CAP:
            self._claimed.popitem(last=False)
        return True

    async def resend_deliverable(self, leaf: bytes) -> bool:
        """Whether a duplicate carrying ``leaf`` should be delivered: its leaf is stored and
        was never handed on (not in this run, not marked in the store)."""
        store = self.store
        if leaf in self._claimed or store is None:
            return False
        await store.drain()  # a copy still in the group commit is found, not taken for new
        state = await store.handed_state(leaf)
        return state is not None and state != 1 and leaf not in self._claimed


def claim(broadcast: dict[str, Any], claimed: list[Ticket]) -> bool:
    """For the fan-out, before it delivers ``broadcast``: False if it carries a ticket whose
    leaf was already handed on in this run (a second copy: not delivered); otherwise True,
    and its ticket is added to ``claimed`` for :func:`handed`."""
    ticket = getattr(broadcast.get("data"), "ticket", None)
    if ticket is None:
        return True
    if not ticket.owner._claim(ticket.leaf):
        _settle(ticket)  # its twin was handed on: this copy is acknowledged
        return False
    claimed.append(ticket)
    return True


def handed(claimed: list[Ticket]) -> None:
    """For the fan-out, right after the batch was written: each waiting QoS 1 PUBACK is
    written now, in the same step (a kill cannot fall between the two), the tickets resolve,
    and the leaves are marked handed on (lazily)."""
    if not claimed:
        return
    for ticket in claimed:
        _settle(ticket)
    store = claimed[0].owner.store
    if store is not None:
        store.mark_handed_soon([t.leaf for t in claimed])


def _settle(ticket: Ticket) -> None:
    if not ticket.done.done():
        if ticket.ack is not None:
            ticket.ack()
        ticket.done.set_result(None)


def is_resend(data: object) -> bool:
    """Whether a broadcast's payload is a re-send after a crash (:attr:`Ticket.resend`)."""
    ticket = getattr(data, "ticket", None)
    return ticket is not None and bool(ticket.resend)


def uncharged(verdict: Charge | Verdict, meter: Meter) -> Charge | Verdict:
    """The gate's verdict for a re-send after a crash: a paid delivery is let through free
    (its reservation released), as a redelivery is. Its subscribers may have got and paid for
    it before the kill (a PUBACK lost with the connection before the leaf's mark was durable):
    charging it again would bill one message twice; the seller forgoes at most that one
    message per crash instead. A refusal (no entitlement, no credit) stays a refusal."""
    if type(verdict) is Charge:
        meter.release(verdict)
        return Verdict.FREE
    return verdict
