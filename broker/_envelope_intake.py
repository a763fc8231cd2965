"""Market envelopes entering the broker: verified once, admitted once, their leaf stored.

Why apart from the service: this is the publish side of anchoring (signature check,
de-duplication by (device, topic, sequence), the durable leaf and the seller's leaf budget),
and the service module holds the wiring. :class:`EnvelopeIntake` is a base of
:class:`~blendsm.broker.MarketplaceService`, which sets the state it reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from blendsm.broker._access import AccessDecisions
from blendsm.broker._anchors import Anchorer
from blendsm.broker._dedup import DedupWindow
from blendsm.broker._handoff import HandOff, Ticket
from blendsm.broker._log_limit import LogLimiter
from blendsm.device_sdk import Envelope, MessageDomain, decode_envelope, verify_envelope_leaf
from blendsm.errors import EnvelopeError

if TYPE_CHECKING:
    from amqtt.session import Session

__all__ = ["EnvelopeIntake"]


class EnvelopeIntake(AccessDecisions):
    """The publish side of a market topic: check, de-duplicate and anchor each envelope."""

    messages: MessageDomain
    dedup: DedupWindow
    anchorer: Anchorer | None
    _duplicates_log: LogLimiter
    _hand_off: HandOff | None = None

    def seller_of(self, topic: str) -> str | None:
        """The seller whose leaf budget ``topic``'s leaves count against (the chain view's)."""
        info = self.view.topic_for_name(topic)
        return None if info is None else info.seller.lower()

    def inspect_publish(
        self, session: Session, topic: str, data: bytes | bytearray
    ) -> tuple[Envelope, bytes] | Literal[False] | None:
        """For a PUBLISH on a market topic by an allowed device: the verified envelope and its
        leaf; False if it is not a valid envelope signed by that device (the message is then
        dropped); None when it is not ours to check (not a market topic, or not allowed:
        amqtt's PUBLISH decision refuses it later)."""
        ident = self.identity(session)
        view = self.view
        topic_info = view.topic_for_name(topic)
        if ident is None or not ident.key or topic_info is None:
            return None
        if not view.can_publish(ident.key, topic_info.topic_id):
            return None
        try:
            envelope = decode_envelope(data)
            signer, leaf = verify_envelope_leaf(self.messages, topic, envelope)
        except EnvelopeError as exc:
            self.stats.envelopes_refused += 1
            self.log.warning("PUBLISH on %r from %s dropped: %s", topic, ident.address, exc)
            return False
        if topic_info.encrypted and not envelope.encrypted:
            self.stats.envelopes_refused += 1
            self.log.warning(
                "PUBLISH on %r from %s dropped: the topic is marked encrypted on chain and"
                " the payload is not",
                topic,
                ident.address,
            )
            return False
        if signer.lower() != ident.key:
            self.stats.envelopes_refused += 1
            self.log.warning(
                "PUBLISH on %r from %s dropped: signed by %s, not by the publishing device",
                topic,
                ident.address,
                signer,
            )
            return False
        return envelope, leaf

    def hand_off(self) -> HandOff:
        """This run's record of the leaves handed to the fan-out (over the current store)."""
        store = self.anchorer.store if self.anchorer is not None else None
        hand_off = self._hand_off
        if hand_off is None or hand_off.store is not store:
            hand_off = self._hand_off = HandOff(store)
        return hand_off

    async def report_unhanded(self) -> None:
        """At a start: count and log the leaves an earlier run stored and never handed to
        the fan-out (killed in between): anchored, but no live subscriber got them unless
        their device sends them again (then they are delivered)."""
        store = self.anchorer.store if self.anchorer is not None else None
        found = 0 if store is None else await store.report_unhanded()
        if found:
            self.stats.leaves_unhanded_at_start += found
            self.log.warning(
                "%d messages stored before the restart were never recorded as handed to"
                " subscribers (the broker stopped first; marks lag up to 50 ms, so at most):"
                " anchored; delivered only if their device re-sends them",
                found,
            )

    async def admit_envelope(
        self, topic: str, envelope: Envelope, leaf: bytes, qos: int
    ) -> Ticket | None:
        """Admit a verified envelope once per (device, topic, sequence): store its leaf (awaited
        for QoS 1/2, before the PUBACK) and return the ticket the fan-out claims
        (:mod:`blendsm.broker._handoff`); None for a duplicate or a replay older than the
        window, which is counted and must be dropped (still acknowledged), unless its leaf
        is stored and was never handed on (a re-send after a crash: delivered this time).
        Raises LeafBudgetError (nothing stored or admitted) while the topic's seller has
        ``anchoring.max_pending_leaves_per_seller`` leaves waiting for an anchor."""
        device, sequence, dedup = envelope.device, envelope.sequence, self.dedup
        if not dedup.known(device, topic):  # evicted at the cap: ask the durable leaf store
            store = self.anchorer.store if self.anchorer is not None else None
            if store is None:
                raise RuntimeError("leaf store closed: cannot tell a duplicate, not admitted")
            await store.drain()
            high = await store.high_sequence(device, topic)
            if high is not None:
                dedup.seed(device, topic, high)
        if not dedup.admit(device, topic, sequence):
            hand_off = self.hand_off()
            if await hand_off.resend_deliverable(leaf):
                self.stats.resends_delivered += 1
                self.log.info(
                    "re-sent envelope on %r from %s, sequence %d: stored but never handed to"
                    " subscribers (the broker stopped in between): delivered now, uncharged",
                    topic,
                    envelope.device_address,
                    sequence,
                )
                return hand_off.ticket(leaf, resend=True)
            self._duplicate(topic, envelope)
            return None
        anchorer = self.anchorer
        if anchorer is not None:
            try:
                if qos:
                    await anchorer.add(topic, envelope, leaf)
                else:
                    anchorer.add_nowait(topic, envelope, leaf)
            except BaseException:
                dedup.forget(device, topic, sequence)  # not acknowledged: it will come again
                raise
        return self.hand_off().ticket(leaf)

    def _duplicate(self, topic: str, envelope: Envelope) -> None:
        stats = self.stats
        stats.duplicates_dropped += 1
        self.log.debug(
            "duplicate envelope on %r from %s, sequence %d: dropped (acknowledged, not delivered)",
            topic,
            envelope.device_address,
            envelope.sequence,
        )
        self._duplicates_log.note(
            "duplicate or replayed envelope on %r from %s dropped (%d in all)",
            topic,
            envelope.device_address,
            stats.duplicates_dropped,
        )
