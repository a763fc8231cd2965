"""Prometheus metrics for a running broker: ``GET /metrics`` in the text exposition format.

Nothing is counted for metrics alone beyond plain integer increments: :class:`BrokerCollector`
is a ``prometheus_client`` collector that reads the counters the service, chain view, meter,
settler and anchorer keep, and the broker's sessions, when Prometheus scrapes. The
:class:`MetricsServer` is a small asyncio HTTP server on the broker's event loop, so a scrape
reads that state from the thread that changes it (no locks, no torn reads). It has its own
:class:`~prometheus_client.CollectorRegistry`: several brokers in one process (tests) do not
clash, and the process-wide default metrics are not mixed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blendsm.broker._config_listeners import TlsConfig, server_ssl_context

if TYPE_CHECKING:
    from blendsm.broker._service import MarketplaceService

__all__ = ["BrokerCollector", "MetricsServer"]

_log = logging.getLogger("blendsm.broker.metrics")

_READ_TIMEOUT = 5.0
"""Seconds a client may take to send its request head before the connection is dropped."""
_MAX_HEAD = 16 * 1024
"""Largest request head accepted (bytes)."""


_SETTLER_COUNTERS: Final = (
    (
        "claims_confirmed",
        "Voucher claims confirmed on chain by this broker process.",
        "claims_confirmed",
    ),
    ("claim_gas", "Gas used by this broker process's confirmed claims.", "gas_used"),
    (
        "claim_failures",
        "Claim attempts that failed (reverted, refused, node unreachable): chain errors.",
        "failures",
    ),
    (
        "claims_cut_short",
        "Lane claims the shared deposit paid short (the payer overcommitted its lanes).",
        "claims_cut_short",
    ),
)
"""``(metric, documentation, Settler attribute)`` of the settlement counters."""

_ANCHORER_COUNTERS: Final = (
    ("anchor_batches", "Batches of message leaves anchored on chain.", "batches_anchored"),
    ("anchor_gas", "Gas used by anchor transactions.", "gas_used"),
    ("anchor_leaves", "Message leaves made durable for anchoring.", "leaves"),
    (
        "anchor_failures",
        "Anchor attempts that failed (node unreachable, reverted, ...): chain errors.",
        "failures",
    ),
    (
        "anchors_deferred",
        "Times a due anchor waited for anchoring.max_roots_per_hour (the operator's gas ceiling).",
        "anchors_deferred",
    ),
    (
        "anchor_leaves_refused",
        "Market messages refused: their seller had anchoring.max_pending_leaves_per_seller"
        " leaves waiting for an anchor.",
        "leaves_refused",
    ),
)
"""``(metric, documentation, Anchorer attribute)`` of the anchoring counters."""


class BrokerCollector(Collector):
    """Reads a :class:`MarketplaceService`'s live counters at scrape time (names ``blendsm_*``)."""

    def __init__(self, service: MarketplaceService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        service = self.service
        stats = service.stats
        meter = service.meter
        settler = service.settler
        anchorer = service.anchorer

        def counter(name: str, documentation: str, value: float) -> Metric:
            return CounterMetricFamily(f"blendsm_{name}", documentation, value=value)

        def gauge(name: str, documentation: str, value: float) -> Metric:
            return GaugeMetricFamily(f"blendsm_{name}", documentation, value=value)

        # --- access and delivery
        yield counter("connects_accepted", "CONNECTs accepted.", stats.connects_accepted)
        yield counter("connects_refused", "CONNECTs refused.", stats.connects_refused)
        yield counter(
            "paid_deliveries",
            "Paid messages delivered and charged to a payment channel.",
            meter.delivered,
        )
        yield counter(
            "public_deliveries",
            "Free deliveries on public (non-market) topics admitted by the delivery gate.",
            stats.public_deliveries,
        )
        yield counter(
            "free_market_deliveries",
            "Deliveries on market topics priced 0 admitted by the delivery gate (not charged).",
            stats.free_market_deliveries,
        )
        yield counter(
            "deliveries_denied",
            "Market-topic deliveries refused (no subscription right, no channel or no credit).",
            stats.deliveries_denied,
        )
        yield counter(
            "deliveries_denied_no_credit",
            "Paid deliveries not sent (nor charged) because the channel's credit ran out"
            " (held ones: once dropped from the hold).",
            meter.denied_no_credit,
        )
        yield counter(
            "deliveries_held_for_credit",
            "Live paid deliveries held for a voucher instead of dropped for credit.",
            stats.deliveries_held_for_credit,
        )
        yield counter(
            "deliveries_held_for_window",
            "Live QoS 1/2 deliveries held for a full in-flight window instead of dropped.",
            stats.deliveries_held_for_window,
        )
        yield counter(
            "deliveries_held_dropped",
            "Deliveries held (for credit or a full in-flight window) then dropped, never"
            " charged: hold bound or age (payments.hold_messages, hold_seconds) or their"
            " session disconnected.",
            stats.deliveries_held_dropped,
        )
        yield counter(
            "offline_dropped",
            "Paid messages dropped (not charged) because an offline session's queue was full.",
            stats.offline_dropped,
        )
        yield counter(
            "offline_dropped_public",
            "Free messages dropped because an offline session's queue was full.",
            stats.offline_dropped_public,
        )
        yield counter(
            "offline_refused_no_channel",
            "Paid messages not queued for an offline session without a usable channel.",
            stats.offline_refused_no_channel,
        )
        yield counter(
            "redelivered",
            "QoS 1/2 PUBLISHes (DUP) and PUBRELs re-sent on reconnect (never charged again).",
            stats.redelivered,
        )
        yield counter(
            "inflight_dropped",
            "Deliveries not sent (nor charged): the session's in-flight window was full.",
            stats.inflight_dropped,
        )
        yield counter(
            "sessions_expired",
            "Disconnected persistent sessions dropped after sessions.expiry_seconds.",
            stats.sessions_expired,
        )
        yield counter(
            "persistent_sessions_refused",
            "CONNECTs refused: the identity held sessions.max_per_identity persistent sessions.",
            stats.persistent_sessions_refused,
        )
        yield counter(
            "envelopes_refused",
            "Device publishes refused for a bad or missing signed envelope.",
            stats.envelopes_refused,
        )
        yield counter(
            "duplicates_dropped",
            "Device publishes dropped as a (device, topic, sequence) already admitted.",
            stats.duplicates_dropped,
        )
        yield counter(
            "resends_delivered",
            "Device re-sends delivered: stored before but never handed to subscribers.",
            stats.resends_delivered,
        )
        yield counter(
            "leaves_unhanded_at_start",
            "Messages found at a start stored but never handed to subscribers (crash).",
            stats.leaves_unhanded_at_start,
        )
        yield counter(
            "handoff_timeouts",
            "QoS 1 market publishes acknowledged before being handed to subscribers.",
            stats.handoff_timeouts,
        )
        yield counter(
            "control_dropped",
            "Control publishes dropped unprocessed (a session flooding the control tree).",
            stats.control_dropped,
        )
        yield counter(
            "connections_refused_at_limit",
            "Connections closed at once: the global or per-address connection cap was reached.",
            stats.connections_refused_at_limit,
        )
        yield counter(
            "connect_timeouts",
            "Connections closed for not sending a complete CONNECT in time.",
            stats.connect_timeouts,
        )
        yield counter(
            "connects_rate_limited",
            "Connections closed at once: their address opened connections too fast.",
            stats.connects_rate_limited,
        )
        yield counter(
            "publishes_unacknowledged_unhealthy",
            "Market QoS 1/2 PUBLISHes not acknowledged (connection closed) while the chain"
            " view was unhealthy.",
            stats.publishes_unacknowledged_unhealthy,
        )
        yield counter(
            "publishes_refused_not_serving",
            "Market PUBLISHes refused: the seller did not choose this broker's operator.",
            stats.publishes_refused_not_serving,
        )
        yield counter(
            "subscribes_refused_not_serving",
            "Market SUBSCRIBEs refused: the seller did not choose this broker's operator.",
            stats.subscribes_refused_not_serving,
        )
        yield counter(
            "packets_too_large",
            "Connections closed for announcing a packet over limits.max_packet_bytes.",
            stats.packets_too_large,
        )
        yield counter(
            "protocol_violations",
            "Connections closed for a malformed packet or another MQTT protocol violation.",
            stats.protocol_violations,
        )
        yield counter(
            "incoming_inflight_refused",
            "Connections closed for leaving over limits.max_incoming_inflight QoS 2 messages"
            " unreleased.",
            stats.incoming_inflight_refused,
        )
        yield counter(
            "connections_aborted",
            "Connections aborted at a stop instead of closed cleanly.",
            stats.connections_aborted,
        )
        yield counter(
            "subscriptions_refused_at_limit",
            "Subscription filters refused: the per-session or per-member filter cap was reached.",
            stats.subscriptions_refused_at_limit,
        )
        yield counter(
            "keepalive_timeouts",
            "Connections dropped after 1.5 x their keepalive without a packet (Will sent).",
            stats.keepalive_timeouts,
        )
        yield counter(
            "deliveries_dropped_slow_consumer",
            "Deliveries not sent (nor charged): the session was over its outgoing bound"
            " (sessions.max_outgoing_bytes / max_outgoing_messages).",
            stats.deliveries_dropped_slow_consumer,
        )
        yield counter(
            "deliveries_queued_slow_consumer",
            "QoS 1/2 deliveries to a persistent session over its outgoing bound put in its"
            " offline queue.",
            stats.deliveries_queued_slow_consumer,
        )
        yield counter(
            "notices_dropped_slow_consumer",
            "Notices not sent: the session was over its outgoing bound.",
            stats.notices_dropped_slow_consumer,
        )
        yield counter(
            "slow_consumers_paused",
            "Times a session went over its outgoing bound and was paused.",
            stats.slow_consumers_paused,
        )
        yield counter(
            "slow_consumers_disconnected",
            "Connections aborted: paused for sessions.slow_consumer_seconds without draining.",
            stats.slow_consumers_disconnected,
        )
        yield gauge(
            "sessions_paused",
            "Connected sessions now paused over their outgoing bound.",
            service.backpressure.paused,
        )
        replay = service.replay
        yield counter(
            "replay_requests",
            "Resume requests answered from the replay ring.",
            stats.replay_requests,
        )
        yield counter(
            "replay_served",
            "Envelopes resume requests handed to the delivery gate (written or held for credit).",
            stats.replay_served,
        )
        yield counter(
            "replay_unserved_ranges",
            "Sequence ranges resume answers reported as not served (evicted or over the bound).",
            stats.replay_unserved_ranges,
        )
        yield gauge("replay_entries", "Envelopes held in the replay rings.", len(replay))
        yield gauge(
            "replay_bytes",
            "Bytes held in the replay rings (payloads + per-entry overhead).",
            replay.size,
        )
        yield counter(
            "revocation_disconnects",
            "Sessions closed because their participant or device was revoked on chain.",
            stats.disconnects_revoked,
        )
        # --- payments
        yield counter("quotes", "Price quotes sent to subscribers.", stats.quotes)
        yield counter(
            "payment_requests", "Payment requests sent (credit ran out).", stats.payment_requests
        )
        yield counter("vouchers_accepted", "Vouchers accepted.", stats.vouchers_accepted)
        yield counter("vouchers_refused", "Vouchers refused.", stats.vouchers_refused)
        yield counter(
            "vouchers_superseded",
            "Vouchers covered by a higher one of their channel in the same batch (not stored).",
            stats.vouchers_superseded,
        )
        yield counter(
            "vouchers_repeated",
            "Vouchers equal to the latest accepted one (re-sent): answered with a receipt.",
            stats.vouchers_repeated,
        )
        yield counter(
            "voucher_batches",
            "Voucher intake batches (one store commit at most each).",
            stats.voucher_batches,
        )
        yield counter(
            "receipts_sent", "Receipt notices sent (cumulative, batched).", stats.receipts_sent
        )
        yield counter(
            "notices_dropped",
            "Voucher receipts and refusals not sent: the session's control tasks were at their bound.",
            stats.notices_dropped,
        )
        yield counter("proofs_served", "Inclusion proofs served.", stats.proofs_served)
        # --- settlement and anchoring: 0 until their background task exists
        for name, documentation, attribute in _SETTLER_COUNTERS:
            yield counter(name, documentation, getattr(settler, attribute) if settler else 0)
        yield gauge(
            "operator_low_gas",
            "1 while the operator's native balance is below min_gas_balance_wei, else 0.",
            1 if settler is not None and settler.low_gas else 0,
        )
        for name, documentation, attribute in _ANCHORER_COUNTERS:
            yield counter(name, documentation, getattr(anchorer, attribute) if anchorer else 0)
        yield counter(
            "anchor_notices",
            "Anchor notices published to subscribers.",
            stats.anchor_notices,
        )
        # --- chain
        errors = CounterMetricFamily(
            "blendsm_chain_errors",
            "Failed chain requests (node unreachable, timeout, JSON-RPC error such as a revert)"
            " made by the broker's background work, by source.",
            labels=["source"],
        )
        for source, count in service.chain_errors.by_source.items():
            errors.add_metric([source], count)
        yield errors
        view = service.view
        yield counter(
            "chain_view_hits",
            "Access and channel lookups answered from the chain view's records.",
            view.hits,
        )
        misses = CounterMetricFamily(
            "blendsm_chain_view_misses",
            "Lookups the chain view could not answer from its state, answered no (fail closed):"
            " no such record, or the view unhealthy.",
            labels=["reason"],
        )
        misses.add_metric(["unknown"], view.misses_unknown)
        misses.add_metric(["unhealthy"], view.misses_unhealthy)
        yield misses
        # --- state
        yield gauge(
            "chain_view_healthy",
            "1 while the chain view is synced and caught up (market decisions trusted), else 0.",
            1 if service.view.unhealthy_reason is None else 0,
        )
        yield gauge("connected_sessions", "MQTT sessions currently connected.", self._connected())
        yield gauge(
            "metered_channels",
            "Payment channels the meter holds accounts for.",
            len(meter.accounts),
        )
        yield gauge(
            "meter_channel_choice_cache_entries",
            "Entries in the meter's (payer, seller, token) -> channel choice cache.",
            len(meter._choice),
        )

    def _connected(self) -> int:
        broker: Any = self.service.broker
        sessions = getattr(broker, "_sessions", None) or {}
        return sum(
            1
            for session, _handler in list(sessions.values())
            if getattr(getattr(session, "transitions", None), "state", None) == "connected"
        )


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the running event loop; ``await stop()`` closes it."""

    def __init__(
        self, service: MarketplaceService, host: str, port: int, *, tls: TlsConfig | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(service))
        self.host = host
        self.port = port
        self.tls = tls
        """HTTPS when set (``metrics.tls``)."""
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen; ``port`` becomes the bound port (useful with 0)."""
        context = None if self.tls is None else server_ssl_context(self.tls, "metrics.tls")
        handshake = None if context is None else _READ_TIMEOUT  # only meaningful with TLS
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=context, ssl_handshake_timeout=handshake
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        scheme = "http" if self.tls is None else "https"
        _log.info("metrics on %s://%s:%d/metrics", scheme, self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > _MAX_HEAD:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path not in (b"/metrics", b"/"):
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            header = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(header if method == b"HEAD" else header + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
