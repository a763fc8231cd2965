"""The broker's in-memory view of chain state, read synchronously by the delivery hot path.

Why: a chain read costs milliseconds and may hang on a sick node, so the hot path never
awaits the chain. :class:`ChainView` rebuilds registry, market, channel and rating state and
the Brokers operator lists (:mod:`~blendsm.broker._serving`) by replaying the suite's events
from the deployment block (:meth:`ChainView.sync`) and then applies each new event as it
arrives (:meth:`ChainView.run`), through one handler, so the replayed and the live state
cannot diverge.

Fail closed: a cache miss answers "no" (False/None), and while the view is not synced, was
stopped, or has not been caught up with the chain for longer than ``max_staleness`` seconds,
:attr:`ChainView.healthy` is False and every market decision answers "no". The reason is
logged once per change. Public (non-market) topics are not this module's concern. A topic
under the reserved ``blendsm/`` tree (which ``Market`` refuses, but an older deployment did
not) is never a market topic here: its events are ignored, with a warning.

Cache accounting (for metrics, one integer increment per decision lookup): a lookup is a
*hit* when the view is healthy and holds the record the decision is keyed on (the topic, the
participant or device, the channel), whatever the answer; a *miss* when it cannot decide
from its state and answers "no" without asking the chain: ``misses_unknown`` (healthy, no
such record) or ``misses_unhealthy`` (stale, not synced or stopped). A topic name the view
does not know is classified as public, not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from web3 import AsyncWeb3

from blendsm import backoff_delay
from blendsm.broker._config import ChainConfig, default_staleness
from blendsm.broker._serving import ServingLists
from blendsm.broker._topics import is_reserved
from blendsm.broker._view_health import ViewHealth
from blendsm.contracts import (
    ChainEvent,
    ChannelInfo,
    Deployment,
    EventFollower,
    Policy,
    Role,
    Status,
    TopicInfo,
)
from blendsm.errors import ConfigError

__all__ = ["EVENTS", "ChainView", "ChangeListener"]

_log = logging.getLogger("blendsm.broker.chain_view")

#: Every event the view mirrors, as ``Contract.Event`` (the follower's selection).
EVENTS: Final = (
    "Market.AccessListUpdated",
    "Market.PolicyChanged",
    "Market.PriceChanged",
    "Market.TopicCreated",
    "Market.TopicEncryptionChanged",
    "Market.TopicPaused",
    "Market.TopicResumed",
    "PaymentChannels.ChannelClaimed",
    "PaymentChannels.ChannelOpened",
    "PaymentChannels.ChannelSettled",
    "PaymentChannels.ChannelToppedUp",
    "PaymentChannels.CloseRequested",
    "Ratings.Rated",
    "Registry.Applied",
    "Registry.Approved",
    "Registry.DeviceAdded",
    "Registry.DeviceRemoved",
    "Registry.Left",
    "Registry.Rejected",
    "Registry.Revoked",
)

_R = TypeVar("_R")

_CHAIN_DEFAULTS: Final = ChainConfig()
"""The chain defaults are declared once, by the broker config."""

#: Called with each live event after the view applied it (plain or async).
ChangeListener = Callable[[ChainEvent], Awaitable[None] | None]


class ChainView(ViewHealth, ServingLists):
    """Registry, Market, PaymentChannels, Ratings and Brokers' serving lists, mirrored.

    Lookups are plain dict reads keyed by lower-case address (callers may pass any case) and
    never touch the chain. ``confirmations`` is the event depth (0 only on instantly final
    chains); ``max_staleness`` is how long the view may go without being caught up with
    ``head - confirmations`` before it turns unhealthy (None: the config's default for
    this ``poll_interval``). The defaults are :class:`~blendsm.broker.ChainConfig`'s.
    """

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        deployment: Deployment,
        *,
        confirmations: int = _CHAIN_DEFAULTS.confirmations,
        poll_interval: float = _CHAIN_DEFAULTS.poll_interval,
        max_staleness: float | None = None,
        max_range: int = 1_000,
        backoff_max: float = 15.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_staleness is None:
            max_staleness = default_staleness(poll_interval)
        if max_staleness <= poll_interval:
            raise ConfigError("max_staleness must exceed poll_interval")
        self.w3 = w3
        self.confirmations = confirmations
        self.poll_interval = poll_interval
        self.max_staleness = max_staleness
        self.backoff_max = backoff_max
        self.log = logger or _log
        self._clock = clock
        serving_events = self._init_serving(deployment)  # see blendsm.broker._serving
        self.follower = EventFollower(
            w3,
            deployment,
            select=EVENTS + serving_events,
            confirmations=confirmations,
            poll_interval=poll_interval,
            max_range=max_range,
            logger=self.log,
        )
        # participant (lower) -> (role, status); device (lower) -> seller (checksum)
        self._participants: dict[str, tuple[Role, Status]] = {}
        self._devices: dict[str, str] = {}
        self._topics: dict[bytes, TopicInfo] = {}
        self._by_name: dict[str, TopicInfo] = {}
        self._listed: dict[bytes, set[str]] = {}
        # Topics an older Market let a seller create under the reserved blendsm/ tree: ignored.
        self._reserved_ids: set[bytes] = set()
        self._ratings: dict[str, tuple[int, int]] = {}  # ratee (lower) -> (count, total)
        self._channels: dict[bytes, ChannelInfo] = {}
        self._lanes: dict[tuple[bytes, str], int] = {}  # (channel, lane lower) -> laneClaimed
        self._by_payer: dict[str, list[bytes]] = {}  # payer (lower) -> channel ids, oldest first
        self._listeners: list[ChangeListener] = []
        self._synced = False
        self._running = False
        self._broken: str | None = None  # set when applying an event failed: state unknown
        self._caught_up_at = float("-inf")
        self._stopping = asyncio.Event()
        self._init_health()
        self.hits = 0
        """Decision lookups answered from a healthy view's records."""
        self.misses_unknown = 0
        """Decision lookups answered no because the healthy view holds no such record."""
        self.misses_unhealthy = 0
        """Decision lookups answered no because the view is unhealthy (fail closed)."""

    # --- hot-path lookups (synchronous, never touch the chain) --------------------------

    def topic_for_name(self, name: str) -> TopicInfo | None:
        """The market topic with this exact MQTT name; None if unknown or unhealthy."""
        if not self.healthy:
            if name in self._by_name:
                self.misses_unhealthy += 1
            return None
        topic = self._by_name.get(name)
        if topic is not None:
            self.hits += 1
        return topic

    def topic(self, topic_id: bytes) -> TopicInfo | None:
        """The market topic with this id; None if unknown or unhealthy."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        return self._count(self._topics.get(topic_id))

    def is_active(self, address: str) -> bool:
        if not self.healthy:
            self.misses_unhealthy += 1
            return False
        found = self._count(self._participants.get(address.lower()))
        return found is not None and found[1] is Status.ACTIVE

    def role_of(self, address: str) -> Role | None:
        """The role ``address`` holds while active; None otherwise."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        found = self._count(self._participants.get(address.lower()))
        return found[0] if found is not None and found[1] is Status.ACTIVE else None

    def seller_of_device(self, address: str) -> str | None:
        """The seller ``address`` publishes for, only while that seller is an active Seller
        (``Registry.activeSellerOf``)."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        key = address.lower()
        self._count(self._devices.get(key))
        return self._active_seller_of(key)

    def identify(self, address: str) -> tuple[Role, str | None] | None:
        """CONNECT in one counted lookup: ``(role, None)`` for an active participant,
        ``(Role.NONE, seller)`` for a device of an active seller, else None."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        key = address.lower()
        found = self._participants.get(key)
        device_of = self._devices.get(key)
        if found is None and device_of is None:
            self.misses_unknown += 1
            return None
        self.hits += 1
        if found is not None and found[1] is Status.ACTIVE:
            return found[0], None
        seller = self._active_seller_of(key)
        return None if seller is None else (Role.NONE, seller)

    def _running_topic(self, topic_id: bytes) -> TopicInfo | None:
        """The topic of a publish or subscribe decision, counted as a hit or miss; None (the
        answer is no) while the view is unhealthy, the topic unknown or paused."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        t = self._count(self._topics.get(topic_id))
        if t is None or t.paused or not self.serves(t):
            return None
        return t

    def can_publish(self, device: str, topic_id: bytes) -> bool:
        """``Market.canPublish`` (the topic runs, ``device`` acts for its seller) and this
        broker's operator serves the topic (:meth:`serves`)."""
        t = self._running_topic(topic_id)
        if t is None:
            return False
        return self._active_seller_of(device.lower()) == t.seller

    def can_subscribe(self, buyer: str, topic_id: bytes) -> bool:
        """``Market.canSubscribe``: topic runs, seller and buyer active in their roles, and
        the policy (Open/Allowlist/Denylist/MinRating) admits the buyer; and served here."""
        t = self._running_topic(topic_id)
        if t is None or not self.topic_sells(t):
            return False
        return self.admits_buyer(t, buyer.lower())

    def topic_sells(self, t: TopicInfo) -> bool:
        """The topic half of ``canSubscribe`` for a record this healthy view just returned:
        not paused, its seller an active Seller, served here. The delivery gate reads it once per
        broadcast, then :meth:`admits_buyer` per subscriber."""
        seller_active = self._has_active_role(t.seller.lower(), Role.SELLER)
        return not t.paused and seller_active and self.serves(t)

    def admits_buyer(self, t: TopicInfo, key: str) -> bool:
        """The buyer half of ``canSubscribe`` (``key`` lower-case): an active Buyer whom the
        topic's policy admits."""
        if not self._has_active_role(key, Role.BUYER):
            return False
        topic_id = t.topic_id
        policy = t.policy
        if policy is Policy.OPEN:
            return True
        listed = key in self._listed.get(topic_id, ())
        if policy is Policy.ALLOWLIST:
            return listed
        if policy is Policy.DENYLIST:
            return not listed
        return self._average_x100(key) >= t.min_rating_x100

    def channel(self, channel_id: bytes) -> ChannelInfo | None:
        """The channel's state as of the last applied event; None if unknown or unhealthy."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return None
        return self._count(self._channels.get(channel_id))

    def lane_claimed(self, channel_id: bytes, lane: str) -> int:
        """What ``lane`` claimed on the channel, as of the last applied event (lanes, issue
        14: with the channel's ``claimed`` over all lanes it bounds what the lane can reach)."""
        return self._lanes.get((channel_id, lane.lower()), 0)

    def channel_record(self, channel_id: bytes) -> ChannelInfo | None:
        """The channel as last seen, healthy or not: bookkeeping only, never a decision."""
        return self._channels.get(channel_id)

    def channels_of(self, payer: str) -> list[ChannelInfo]:
        """Every channel ``payer`` opened, oldest first; empty if unknown or unhealthy."""
        if not self.healthy:
            self.misses_unhealthy += 1
            return []
        channels = self._channels
        ids = self._count(self._by_payer.get(payer.lower()))
        return [channels[c] for c in ids] if ids else []

    def is_market_topic(self, name: str) -> bool:
        """Whether ``name`` is a market topic as far as the view has seen, healthy or not.

        Classification, not a decision: while the chain is unreachable the broker must still
        tell paid topics (answer no) from public ones (keep working)."""
        return name in self._by_name

    def average_x100(self, address: str) -> int:
        """``Ratings.averageX100`` as learnt from Rated events (0 if unrated)."""
        return self._average_x100(address.lower())

    def _count(self, record: _R | None) -> _R | None:
        """Count a healthy lookup as a hit (record found) or an unknown-record miss."""
        if record is None:
            self.misses_unknown += 1
        else:
            self.hits += 1
        return record

    def _has_active_role(self, key: str, role: Role) -> bool:
        found = self._participants.get(key)
        return found is not None and found[1] is Status.ACTIVE and found[0] is role

    def _active_seller_of(self, key: str) -> str | None:
        seller = self._devices.get(key)
        if seller is None or not self._has_active_role(seller.lower(), Role.SELLER):
            return None
        return seller

    def _average_x100(self, key: str) -> int:
        count, total = self._ratings.get(key, (0, 0))
        return total * 100 // count if count else 0

    # --- listeners ---------------------------------------------------------------------

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback`` with every live event once applied (e.g. Revoked -> disconnect).
        Replayed events during :meth:`sync` are not reported. Returns an unsubscribe function."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    async def _notify(self, event: ChainEvent) -> None:
        for callback in list(self._listeners):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a listener's bug must not stop the view
                self.log.exception(
                    "chain view: listener failed on %s.%s", event.contract, event.event
                )

    # --- following ---------------------------------------------------------------------

    async def sync(self) -> None:
        """Replay every event from the deployment block up to ``head - confirmations``
        (chain errors propagate: the view stays unhealthy)."""
        while not await self._step(notify=False):
            pass
        self._synced = True
        self.log.info(
            "chain view: synced to block %d (%d topics, %d participants, %d devices, %d channels)",
            self.follower.cursor,
            len(self._topics),
            len(self._participants),
            len(self._devices),
            len(self._channels),
        )

    async def run(self) -> None:
        """Sync if needed, then follow new events until :meth:`stop`. Node failures are
        logged and retried with backoff; the view turns unhealthy once stale."""
        self._stopping.clear()
        self._running = True
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    if not self._synced:
                        await self.sync()
                        continue
                    caught_up = await self._step(notify=True)
                except Exception as exc:
                    failures += 1
                    # poll_interval * 2**failures, capped: the first retry waits two polls.
                    delay = backoff_delay(
                        failures + 1, base=self.poll_interval, cap=self.backoff_max
                    )
                    self.log.warning(
                        "chain view: chain poll failed (%d in a row), retrying in %.2fs: %s",
                        failures,
                        delay,
                        exc,
                    )
                    await self._sleep(delay)
                    continue
                failures = 0
                if caught_up:
                    await self._sleep(self.poll_interval)
        finally:
            self._running = False

    def stop(self) -> None:
        """End :meth:`run`; the view then turns unhealthy (at once: it no longer follows)."""
        self._stopping.set()
        self._synced = False
        self.log.info("chain view: stopped")

    async def _step(self, *, notify: bool) -> bool:
        """Apply the next confirmed range; True once caught up with ``head - confirmations``."""
        events = await self.follower.poll()
        for event in events:
            try:
                self.apply(event)
            except Exception as exc:  # our bug or an ABI drift: the state is now unknown
                self._broken = f"cannot apply {event.contract}.{event.event}: {exc!r}"
                self.log.exception("chain view: %s", self._broken)
                raise
            if notify:
                await self._notify(event)
        head = int(await self.w3.eth.block_number)
        caught_up = self.follower.cursor >= head - self.confirmations
        if caught_up:
            self._caught_up_at = self._clock()
        return caught_up

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # --- the one handler ---------------------------------------------------------------

    def apply(self, event: ChainEvent) -> None:
        """Fold one event into the state (the same for replayed and live events)."""
        a = event.args
        name = event.event
        if event.contract == "Registry":
            if name == "DeviceAdded":
                self._devices[a["device"].lower()] = a["seller"]
            elif name == "DeviceRemoved":
                self._devices.pop(a["device"].lower(), None)
            else:
                key = a["account"].lower()
                role = self._participants.get(key, (Role.NONE, Status.NONE))[0]
                if name == "Applied":
                    self._participants[key] = (Role(a["role"]), Status.PENDING)
                elif name == "Approved":
                    self._participants[key] = (Role(a["role"]), Status.ACTIVE)
                elif name == "Rejected":
                    self._participants[key] = (role, Status.REJECTED)
                elif name == "Revoked":
                    self._participants[key] = (role, Status.REVOKED)
                elif name == "Left":
                    self._participants[key] = (role, Status.LEFT)
        elif event.contract == "Market":
            topic_id = bytes(a["topicId"])
            if topic_id in self._reserved_ids:
                return
            if name == "TopicCreated" and is_reserved(a["name"]):
                self._reserved_ids.add(topic_id)
                self.log.warning(
                    "chain view: ignoring topic %r of seller %s (0x%s): the blendsm/ tree is"
                    " reserved for the broker, never a market topic",
                    a["name"],
                    a["seller"],
                    topic_id.hex(),
                )
                return
            if name == "TopicCreated":
                token = a["token"]
                self._put_topic(
                    TopicInfo(
                        topic_id=topic_id,
                        name=a["name"],
                        seller=a["seller"],
                        token=None if int(token, 16) == 0 else token,
                        price=int(a["price"]),
                        policy=Policy(a["policy"]),
                        min_rating_x100=int(a["minRatingX100"]),
                        paused=False,
                    )
                )
                return
            t = self._topics.get(topic_id)
            if t is None:
                raise ValueError(f"{name} for unknown topic 0x{topic_id.hex()}")
            if name == "PriceChanged":
                self._put_topic(dataclasses.replace(t, price=int(a["newPrice"])))
            elif name == "PolicyChanged":
                self._put_topic(
                    dataclasses.replace(
                        t, policy=Policy(a["policy"]), min_rating_x100=int(a["minRatingX100"])
                    )
                )
            elif name == "AccessListUpdated":
                listed = self._listed.setdefault(topic_id, set())
                if a["listed"]:
                    listed.add(a["account"].lower())
                else:
                    listed.discard(a["account"].lower())
            elif name == "TopicPaused":
                self._put_topic(dataclasses.replace(t, paused=True))
            elif name == "TopicResumed":
                self._put_topic(dataclasses.replace(t, paused=False))
            elif name == "TopicEncryptionChanged":
                self._put_topic(dataclasses.replace(t, encrypted=bool(a["encrypted"])))
        elif event.contract == "PaymentChannels":
            channel_id = bytes(a["channelId"])
            if name == "ChannelOpened":
                operator, token = a["operator"], a["token"]
                self._channels[channel_id] = ChannelInfo(
                    channel_id=channel_id,
                    payer=a["payer"],
                    payee=a["payee"],
                    operator=None if int(operator, 16) == 0 else operator,
                    token=None if int(token, 16) == 0 else token,
                    deposit=int(a["deposit"]),
                    claimed=0,
                    fee_bps=int(a["feeBps"]),
                    closes_at=None,
                    settled=False,
                )
                self._by_payer.setdefault(a["payer"].lower(), []).append(channel_id)
                return
            c = self._channels.get(channel_id)
            if c is None:
                raise ValueError(f"{name} for unknown channel 0x{channel_id.hex()}")
            if name == "ChannelToppedUp":
                c = dataclasses.replace(c, deposit=int(a["deposit"]))
            elif name == "ChannelClaimed":
                c = dataclasses.replace(c, claimed=int(a["totalClaimed"]))
                self._lanes[(channel_id, a["lane"].lower())] = int(a["laneClaimed"])
            elif name == "CloseRequested":
                c = dataclasses.replace(c, closes_at=int(a["closesAt"]) or None)
            elif name == "ChannelSettled":
                c = dataclasses.replace(c, settled=True)
            self._channels[channel_id] = c
        elif event.contract == "Brokers":
            self._apply_brokers(event)
        elif event.contract == "Ratings" and name == "Rated":
            key = a["ratee"].lower()
            count, total = self._ratings.get(key, (0, 0))
            self._ratings[key] = (count + 1, total + int(a["score"]))

    def _put_topic(self, topic: TopicInfo) -> None:
        self._topics[topic.topic_id] = topic
        self._by_name[topic.name] = topic

    # HTTP API
    def all_topics(self) -> list[TopicInfo]:
        """Every market topic as last seen, healthy or not (read-only listings, not decisions)."""
        return list(self._topics.values())

    # HTTP API
    def all_channels(self) -> list[ChannelInfo]:
        """Every channel as last seen, oldest first, healthy or not (read-only listings)."""
        return list(self._channels.values())

    # HTTP API
    def rating_of(self, address: str) -> tuple[int, int]:
        """``Ratings.ratingOf`` as learnt from Rated events: (count, total), (0, 0) if unrated."""
        return self._ratings.get(address.lower(), (0, 0))
