"""The marketplace service's counters, apart so the access decisions and the service wiring
(which both count) share one definition without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServiceStats"]


@dataclass(slots=True)
class ServiceStats:
    """Counters for logs, tests, the demo and metrics."""

    connects_accepted: int = 0
    replay_requests: int = 0
    """Resume requests answered (:mod:`~blendsm.broker._replay_serve`)."""
    replay_served: int = 0
    """Envelopes a resume request handed to the delivery gate (written or held for credit)."""
    replay_unserved_ranges: int = 0
    """Sequence ranges resume answers reported as not served (older than the ring, or over
    the session's outgoing bound)."""
    replay_over_bound: int = 0
    """Resumes cut short by the session's outgoing bound."""
    connects_refused: int = 0
    deliveries_denied: int = 0
    vouchers_accepted: int = 0
    vouchers_refused: int = 0
    vouchers_superseded: int = 0
    """Vouchers never verified or stored because a higher one of the same channel, taken in
    the same batch, was accepted (it covers them: vouchers are cumulative)."""
    vouchers_repeated: int = 0
    """Vouchers equal to the channel's latest accepted one (a payer's re-send): not refused,
    answered with a Receipt for what is held."""
    voucher_batches: int = 0
    """Batches the voucher intake processed (each: at most one store transaction)."""
    receipts_sent: int = 0
    """Receipt notices sent (batched: one covers every voucher of its channel before it)."""
    notices_dropped: int = 0
    """Voucher receipts and refusals not sent: the session had ``MAX_CONTROL_TASKS`` control
    tasks in process (it does not read its notices)."""
    payment_requests: int = 0
    quotes: int = 0
    disconnects_revoked: int = 0
    deliveries_held_for_credit: int = 0
    """Live paid deliveries refused for credit (or queued behind one of their topic) and held
    for a voucher instead of dropped (``payments.hold_messages``)."""
    deliveries_held_for_window: int = 0
    """Live QoS 1/2 deliveries that met a full in-flight window (or queued behind one of their
    topic) and were held until an acknowledgement freed it, instead of dropped."""
    deliveries_held_dropped: int = 0
    """Held deliveries dropped, never charged: past ``payments.hold_messages`` or
    ``hold_seconds``, or their session disconnected (QoS 1/2 of a persistent session go to its
    offline queue instead)."""
    offline_dropped: int = 0
    """Paid messages dropped (not charged) because an offline session's queue was full."""
    offline_dropped_public: int = 0
    """Free (public or priced 0) messages dropped because an offline session's queue was full
    (``sessions.max_queued_messages`` or ``max_queued_bytes``)."""
    offline_refused_no_channel: int = 0
    """Paid messages not queued for an offline session that has no usable channel for them
    (not charged: it was not entitled to them)."""
    redelivered: int = 0
    """QoS 1/2 PUBLISHes (DUP) and PUBRELs re-sent to a reconnecting session (never charged)."""
    inflight_dropped: int = 0
    """Deliveries not sent (nor charged): ``sessions.max_inflight_messages`` unacknowledged."""
    sessions_expired: int = 0
    """Disconnected persistent sessions dropped after ``sessions.expiry_seconds``."""
    persistent_sessions_refused: int = 0
    """CONNECTs refused: the identity already held ``sessions.max_per_identity`` persistent
    sessions."""
    envelopes_refused: int = 0
    publishes_refused_not_serving: int = 0
    """Market PUBLISHes refused: this broker's operator does not serve the topic (Brokers)."""
    subscribes_refused_not_serving: int = 0
    """Market SUBSCRIBEs refused (SUBACK 0x80, notice ``not_serving``): not served here."""
    duplicates_dropped: int = 0
    """Market envelopes dropped as a (device, topic, sequence) already admitted: not
    delivered, charged or anchored again (still acknowledged)."""
    resends_delivered: int = 0
    """Duplicates let through to the fan-out: their leaf was stored but never handed on (the
    broker stopped in between), so the device's re-send is the message's one delivery (the
    fan-out still hands each leaf on once per run)."""
    leaves_unhanded_at_start: int = 0
    """Leaves found at a start stored but never handed to the fan-out (anchored; no live
    subscriber got them unless re-sent)."""
    handoff_timeouts: int = 0
    """QoS 1 market publishes acknowledged without being handed to the fan-out within
    ``HANDOFF_TIMEOUT`` (never broadcast, or the fan-out that far behind)."""
    control_dropped: int = 0
    """Control publishes dropped unprocessed: the session already had its maximum in process."""
    connections_refused_at_limit: int = 0
    """Connections closed at once: ``limits.max_connections`` or ``max_connections_per_ip``
    reached."""
    connect_timeouts: int = 0
    """Connections closed for not sending a complete CONNECT within
    ``limits.connect_timeout_seconds``."""
    subscriptions_refused_at_limit: int = 0
    """Subscription filters refused (SUBACK 0x80): ``limits.max_filters_per_session`` or
    ``max_filters_per_identity`` reached."""
    keepalive_timeouts: int = 0
    """Connections dropped after 1.5 x their keepalive without a packet (Will sent)."""
    connections_aborted: int = 0
    """Connections aborted at a stop instead of closed cleanly: not closed within
    ``limits.shutdown_seconds``, or a reader that ignored its cancels."""
    packets_too_large: int = 0
    """Connections closed for announcing a packet over ``limits.max_packet_bytes`` (its body
    never read)."""
    protocol_violations: int = 0
    """Connections closed for a malformed packet or another MQTT 3.1.1 protocol violation."""
    incoming_inflight_refused: int = 0
    """Connections closed for leaving more than ``limits.max_incoming_inflight`` QoS 2
    messages awaiting their PUBREL."""
    publishes_unacknowledged_unhealthy: int = 0
    """QoS 1/2 PUBLISHes on a market topic not acknowledged (connection closed, the device
    resends) because the chain view was unhealthy."""
    connects_rate_limited: int = 0
    """Connections closed at once: their address exceeded ``limits.connect_rate_per_ip``."""
    proofs_served: int = 0
    anchor_notices: int = 0
    public_deliveries: int = 0
    """Deliveries on public (non-market) topics admitted by the gate: free, never metered."""
    free_market_deliveries: int = 0
    """Deliveries on market topics priced 0 admitted by the gate (entitled, not charged)."""
    deliveries_dropped_slow_consumer: int = 0
    """Deliveries not sent (nor charged) to a connected session over its outgoing bound
    (``sessions.max_outgoing_bytes`` / ``max_outgoing_messages``): a client not reading."""
    deliveries_queued_slow_consumer: int = 0
    """QoS 1/2 deliveries to a persistent session over its outgoing bound put in its offline
    queue instead (bounded by ``sessions.max_queued_*``; sent when it drains or reconnects)."""
    notices_dropped_slow_consumer: int = 0
    """Notices (quotes, receipts, payment requests, refusals) not sent to a session over its
    outgoing bound."""
    slow_consumers_paused: int = 0
    """Times a connected session went over its outgoing bound and was paused."""
    slow_consumers_disconnected: int = 0
    """Connections aborted: paused for ``sessions.slow_consumer_seconds`` without draining."""
