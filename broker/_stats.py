"""The marketplace service's counters, apart so the access decisions and the service wiring
(which both count) share one definition without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServiceStats"]


@dataclass(slots=True)
class ServiceStats:
    """Counters for logs, tests, the demo and metrics."""

    connects_accepted: int = 0
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
    offline_dropped: int = 0
    envelopes_refused: int = 0
    duplicates_dropped: int = 0
    """Market envelopes dropped as a (device, topic, sequence) already admitted: not
    delivered, charged or anchored again (still acknowledged)."""
    control_dropped: int = 0
    """Control publishes dropped unprocessed: the session already had its maximum in process."""
    connections_refused_at_limit: int = 0
    """Connections closed at once: ``limits.max_connections`` or ``max_connections_per_ip``
    reached."""
    connect_timeouts: int = 0
    """Connections closed for not sending a complete CONNECT within
    ``limits.connect_timeout_seconds``."""
    keepalive_timeouts: int = 0
    """Connections dropped after 1.5 x their keepalive without a packet (Will sent)."""
    proofs_served: int = 0
    anchor_notices: int = 0
    public_deliveries: int = 0
    """Deliveries on public (non-market) topics admitted by the gate: free, never metered."""
    free_market_deliveries: int = 0
    """Deliveries on market topics priced 0 admitted by the gate (entitled, not charged)."""
