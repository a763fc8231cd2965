"""The broker's optional read-only HTTP API and web dashboard (``http.port`` in the config).

Why here and why this way: it is the marketplace's REST face (topics, prices, ratings, live
channels, anchors, proofs) for people and tools that do not speak MQTT, and it must never slow
the MQTT hot path. So it runs on the broker's own event loop (aiohttp) and answers from the
state the broker already holds in memory: the chain view, the service counters, the meter and
the settler. Only two things leave memory, both off the loop or awaited:

* the anchor list is read from the leaf store's SQLite file through a separate read-only
  connection on this server's own worker thread (WAL lets it read while the anchorer writes,
  and it never queues behind the anchorer's writes);
* a proof is looked up through the anchorer's async store API (as MQTT proof requests are)
  and checked with one ``DataAnchors.verify`` call.

Every response is JSON (``orjson``; integers beyond 64 bits fall back to the standard encoder,
still as JSON numbers) with ``Cache-Control: no-store``. Unknown paths answer 404, bad
parameters 400 naming the parameter, and any bug 500 with the traceback in the log; nothing a
client sends can stop the broker. ``GET /`` and ``GET /static/{name}`` serve the dashboard's
files from the ``blendsm.broker`` package's ``_dashboard`` folder, and only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from blendsm.broker._broker_directory import BrokerDirectory, DirectorySnapshot
from blendsm.broker._config_listeners import TlsConfig, server_ssl_context
from blendsm.contracts import ChannelInfo, ServingOperators, TopicInfo
from blendsm.errors import ChainError

if TYPE_CHECKING:
    from blendsm.broker._service import MarketplaceService

__all__ = ["ANCHORS_DEFAULT", "ANCHORS_MAX", "HttpServer", "dumps"]

_log = logging.getLogger("blendsm.broker.http")

ANCHORS_DEFAULT: Final = 20
"""Anchors listed by ``GET /api/anchors`` without ``limit``."""
ANCHORS_MAX: Final = 500
"""Largest ``limit`` of ``GET /api/anchors``; larger values are capped to it."""

_VERIFY_TIMEOUT: Final = 10.0
"""Seconds the one ``DataAnchors.verify`` call of a proof request may take."""
_HEX32 = re.compile(r"0x[0-9a-fA-F]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_STATUS: Final = {"intent": "pending", "sent": "pending", "confirmed": "confirmed"}
"""Leaf store batch states as the API names them (others, e.g. ``failed``, as they are)."""


def _serving_json(serving: ServingOperators | None) -> dict[str, Any] | None:
    """None when not known (no Brokers contract, or not read yet)."""
    if serving is None:
        return None
    return {"any_operator": serving.any_operator, "operators": list(serving.operators)}


class _BadRequestError(Exception):
    """A request parameter is invalid: answered 400 with this message."""


class _NotFoundError(Exception):
    """The named thing does not exist (or is not ready): answered 404 with this message."""


def dumps(value: Any) -> bytes:
    """JSON bytes: orjson, or the standard encoder for integers beyond 64 bits (uint256
    amounts), which it writes as exact JSON numbers too."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type="application/json")


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + bytes(value).hex()


def _hex32(text: str, name: str) -> bytes:
    if not _HEX32.fullmatch(text):
        raise _BadRequestError(f"{name}: must be 0x followed by 64 hex digits, got {text[:80]!r}")
    return bytes.fromhex(text[2:])


def dashboard_dir() -> Traversable:
    """The dashboard's static files, wherever the package is installed (a wheel too)."""
    return resources.files("blendsm.broker") / "_dashboard"


def _channel_json(info: ChannelInfo, vouchered: int, charged: int) -> dict[str, Any]:
    return {
        "channel_id": _hex(info.channel_id),
        "payer": info.payer,
        "payee": info.payee,
        "token": info.token,
        "deposit": info.deposit,
        "claimed": info.claimed,
        "vouchered": vouchered,
        "charged": charged,
        "remaining": info.deposit - info.claimed,
        "fee_bps": info.fee_bps,
        "closing": info.closing,
        "closes_at": info.closes_at,
        "settled": info.settled,
    }


class HttpServer:
    """``GET /api/...`` and the dashboard on the running event loop; ``await stop()`` closes
    it. ``port`` is the bound port once :meth:`start` returned (useful with 0)."""

    def __init__(
        self, service: MarketplaceService, host: str, port: int, *, tls: TlsConfig | None = None
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.tls = tls
        """HTTPS when set (``http.tls``)."""
        self.started_at = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._db: sqlite3.Connection | None = None
        self._db_path: Path | None = None
        # One thread owns the read-only connection to the leaf store (sqlite3 objects stay on
        # the thread that made them); it is not the anchorer's writer thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blendsm-http")
        self.app = web.Application(middlewares=[self._errors])
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/api/status", self._status)
        self.app.router.add_get("/api/topics", self._topics)
        self.app.router.add_get("/api/channels", self._channels)
        self.app.router.add_get("/api/channels/{channel_id}", self._channel)
        self.app.router.add_get("/api/anchors", self._anchors)
        self.app.router.add_get("/api/proofs/{leaf}", self._proof)
        self.app.router.add_get("/api/brokers", self._brokers)
        self.directory = BrokerDirectory(
            service.marketplace, lambda: [t.topic_id for t in service.view.all_topics()]
        )
        """The Brokers contract's brokers and serving operators, cached (``/api/brokers``)."""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; raises OSError if the address cannot be bound (the caller names the field)."""
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            context = None if self.tls is None else server_ssl_context(self.tls, "http.tls")
            site = web.TCPSite(runner, self.host, self.port, ssl_context=context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.started_at = time.monotonic()
        scheme = "http" if self.tls is None else "https"
        _log.info("HTTP API and dashboard on %s://%s:%d/", scheme, self.host, self.port)

    async def stop(self) -> None:
        """Close the listener and open connections, then the read-only store connection."""
        runner, self._runner = self._runner, None
        await self.directory.close()
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(Exception):
                await loop.run_in_executor(self._executor, self._close_db)
            self._executor.shutdown(wait=False)

    # --- plumbing ------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer is JSON with ``no-store``; a handler's bug is a logged 500."""
        response: web.StreamResponse
        try:
            response = await handler(request)
        except _BadRequestError as exc:
            response = _json({"error": str(exc)}, 400)
        except _NotFoundError as exc:
            response = _json({"error": str(exc)}, 404)
        except web.HTTPException as exc:  # routing: unknown path, wrong method
            reason = "not found" if exc.status == 404 else exc.reason.lower()
            response = _json({"error": f"{reason}: {request.method} {request.path}"}, exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("HTTP %s %s failed", request.method, request.path)
            response = _json({"error": "internal error (see the broker log)"}, 500)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _own_channels(self) -> list[ChannelInfo]:
        operator = self.service.meter.operator
        return [
            c
            for c in self.service.view.all_channels()
            if c.operator is not None and c.operator.lower() == operator
        ]

    def _channel_row(self, info: ChannelInfo) -> dict[str, Any]:
        meter = self.service.meter
        vouchered = meter.paid_of(info.channel_id)
        account = meter.accounts.get(info.channel_id)
        # Without an account nothing was delivered in this process: the meter would start it
        # at the durable voucher amount (see Meter), so that is what counts as charged.
        charged = vouchered if account is None else account.charged
        return _channel_json(info, vouchered, charged)

    def _sessions(self) -> int:
        sessions = getattr(self.service.broker, "_sessions", None) or {}
        return sum(
            1
            for session, _handler in list(sessions.values())
            if getattr(getattr(session, "transitions", None), "state", None) == "connected"
        )

    # --- API -----------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        service = self.service
        view = service.view
        stats = service.stats
        meter = service.meter
        settler = service.settler
        anchorer = service.anchorer
        deployment = service.deployment
        block = view.follower.cursor
        reason = view.unhealthy_reason
        return _json(
            {
                "operator": service.operator.address,
                "chain_id": deployment.chain_id,
                "contracts": dict(sorted(deployment.addresses.items())),
                "block": block if block >= 0 else None,
                "chain_healthy": reason is None,
                "chain_unhealthy_reason": reason,
                "sessions": self._sessions(),
                "uptime_s": int(time.monotonic() - self.started_at),
                "counters": {
                    "deliveries_paid": meter.delivered,
                    "deliveries_denied": stats.deliveries_denied,
                    "vouchers_accepted": stats.vouchers_accepted,
                    "vouchers_refused": stats.vouchers_refused,
                    "anchors_confirmed": anchorer.batches_anchored if anchorer else 0,
                    "amount_charged": sum(a.charged for a in list(meter.accounts.values())),
                    "amount_vouchered": sum(
                        meter.paid_of(c.channel_id) for c in self._own_channels()
                    ),
                    "amount_claimed": settler.amount_claimed if settler else 0,
                },
            }
        )

    async def _topics(self, request: web.Request) -> web.Response:
        view = self.service.view
        ratings: dict[str, tuple[int, int]] = {}
        directory = await self.directory.snapshot()

        def row(t: TopicInfo) -> dict[str, Any]:
            count, total = ratings.setdefault(t.seller, view.rating_of(t.seller))
            return {
                "name": t.name,
                "topic_id": _hex(t.topic_id),
                "seller": t.seller,
                "price": t.price,
                "token": t.token,
                "policy": t.policy.name.lower(),
                "min_rating": t.min_rating_x100 / 100,
                "paused": t.paused,
                "encrypted": t.encrypted,
                # Ratings.averageX100 / 100: the contract's rounding, as MinRating checks it
                "rating": {"count": count, "average": (total * 100 // count) / 100 if count else 0},
                "serving": _serving_json(directory.serving.get(t.topic_id)),
            }

        topics = sorted(view.all_topics(), key=lambda t: t.name)
        return _json({"topics": [row(t) for t in topics]})

    async def _brokers(self, request: web.Request) -> web.Response:
        operator = request.query.get("operator")
        if operator is not None and not _ADDRESS.fullmatch(operator):
            raise _BadRequestError(f"operator: must be 0x and 40 hex digits, got {operator[:80]!r}")
        snapshot = await self.directory.snapshot()
        rows = [
            b.as_json()
            for b in snapshot.brokers
            if operator is None or b.operator.lower() == operator.lower()
        ]
        return _json({"brokers": rows, **self._directory_meta(snapshot)})

    def _directory_meta(self, snapshot: DirectorySnapshot) -> dict[str, Any]:
        age = self.directory.age(snapshot)
        return {
            "age_s": None if age is None else round(age, 3),
            "error": snapshot.error,
            "truncated": snapshot.truncated,
        }

    async def _channels(self, request: web.Request) -> web.Response:
        return _json({"channels": [self._channel_row(c) for c in self._own_channels()]})

    async def _channel(self, request: web.Request) -> web.Response:
        channel_id = _hex32(request.match_info["channel_id"], "channel_id")
        for info in self._own_channels():
            if info.channel_id == channel_id:
                return _json(self._channel_row(info))
        raise _NotFoundError(f"channel_id: no channel 0x{channel_id.hex()} names this operator")

    async def _anchors(self, request: web.Request) -> web.Response:
        text = request.query.get("limit")
        limit = ANCHORS_DEFAULT
        if text is not None:
            try:
                limit = int(text, 10)
            except ValueError:
                raise _BadRequestError(f"limit: must be an integer, got {text[:40]!r}") from None
            if limit < 1:
                raise _BadRequestError(f"limit: must be >= 1, got {limit}")
            limit = min(limit, ANCHORS_MAX)
        anchorer = self.service.anchorer
        if anchorer is None:
            return _json({"anchors": []})
        path = anchorer.store.path
        rows = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._read_batches, path, limit
        )
        return _json(
            {
                "anchors": [
                    {
                        "batch_id": batch_id,
                        "root": _hex(root),
                        "leaf_count": leaf_count,
                        "status": _STATUS.get(state, state),
                        "tx": _hex(tx_hash),
                        "block": block,
                        # when this broker saw the anchor confirmed (the chain's own
                        # timestamp is a block away, and one RPC per row is not an option)
                        "anchored_at": int(updated_at) if state == "confirmed" else None,
                    }
                    for batch_id, root, leaf_count, state, tx_hash, block, updated_at in rows
                ]
            }
        )

    async def _proof(self, request: web.Request) -> web.Response:
        leaf = _hex32(request.match_info["leaf"], "leaf")
        service = self.service
        anchorer = service.anchorer
        if anchorer is None:
            return _json({"error": "broker is shutting down"}, 503)
        record = await anchorer.proof_by_leaf(leaf)  # the lookup MQTT proof requests use
        if record is None:
            raise _NotFoundError(
                f"leaf: 0x{leaf.hex()} is unknown to this broker or its batch is not confirmed"
                " yet; ask again after its anchor"
            )
        verified: bool | None
        error: str | None = None
        try:
            async with asyncio.timeout(_VERIFY_TIMEOUT):
                verified = await service.marketplace.anchors.verify(
                    service.operator.address, record.batch_id, record.leaf, list(record.proof)
                )
        except (ChainError, TimeoutError) as exc:
            verified, error = None, f"DataAnchors.verify failed: {exc}"[:300]
        body: dict[str, Any] = {
            "leaf": _hex(record.leaf),
            "batch_id": record.batch_id,
            "root": _hex(record.root),
            "proof": [_hex(p) for p in record.proof],
            "leaf_count": record.leaf_count,
            "verified_on_chain": verified,
            "index": record.index,
            "topic": record.topic,
            "sequence": record.sequence,
            "device": record.device,
            "tx": _hex(record.tx_hash),
            "block": record.block,
        }
        if error is not None:
            body["verify_error"] = error
        service.stats.proofs_served += 1  # over MQTT or HTTP, one counter
        return _json(body)

    # --- leaf store (on this server's thread) ------------------------------------------

    def _read_batches(self, path: Path, limit: int) -> list[tuple[Any, ...]]:
        if self._db is None or self._db_path != path:
            self._close_db()
            if not path.exists():
                return []
            uri = path.resolve().as_uri() + "?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=5.0)
            self._db_path = path
        return self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, block_number, updated_at"
            " FROM batches ORDER BY batch_id DESC LIMIT ?",
            (limit,),
        ).fetchall()

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # --- dashboard -----------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return await self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return await self._file(request.match_info["name"])

    async def _file(self, name: str) -> web.Response:
        content_type = _CONTENT_TYPES.get(Path(name).suffix.lower())
        if not _STATIC_NAME.fullmatch(name) or ".." in name or content_type is None:
            raise _NotFoundError(f"name: no dashboard file {name[:80]!r}")

        def read() -> bytes | None:
            folder = dashboard_dir()
            # only a plain name listed in the folder: nothing outside it can be named
            if name not in {entry.name for entry in folder.iterdir() if entry.is_file()}:
                return None
            return (folder / name).read_bytes()

        body = await asyncio.to_thread(read)
        if body is None:
            raise _NotFoundError(f"name: no dashboard file {name[:80]!r}")
        return web.Response(body=body, headers={"Content-Type": content_type})
