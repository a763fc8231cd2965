"""Following the suite's contract events with a confirmation depth, exactly once, across restarts.

:class:`EventFollower` polls ``eth_getLogs`` over bounded block ranges and delivers only
blocks at least ``confirmations`` deep (``block <= head - confirmations``), in (block, log
index) order, each log once, decoded into a :class:`ChainEvent`. Its position is a
:class:`Cursor` kept in a pluggable :class:`CursorStore` (a file, memory, or your own), so a
restarted broker resumes where it stopped: no gap, no repeat. (One caveat: a crash between a
handler's return and the cursor save repeats that one event after the restart; a handler that
must never see a repeat keeps the cursor itself, through :class:`CallbackCursorStore`, in the
same transaction as its effects.) Without a stored cursor, following starts at the
deployment block, so the Registry constructor's RoleGranted events, mined earlier, are not seen.

Reorgs: there is no rewinding. With ``confirmations > 0`` we rely on depth, as PoA networks
(QBFT/IBFT are final at once, Clique reorgs are shallow) allow: a block that deep is taken as
final. ``confirmations=0`` is for chains with instant finality (the embedded chain, anvil in
tests); there a reorg could deliver a log that later vanishes. A node whose head falls behind
the cursor (restarted without its state, or a reorg deeper than the depth) is logged and waited
for, never followed backwards.

Node failures never end the follower: it logs, backs off (capped exponential with jitter) and
resumes from its cursor. Only a failing handler or cursor store ends :meth:`EventFollower.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from eth_abi import decode
from eth_utils import event_abi_to_log_topic, to_checksum_address
from web3 import AsyncWeb3
from web3.types import FilterParams, LogReceipt

from blendsm import Jitter, atomic_write_text, backoff_delay
from blendsm.contracts._artifacts import LATER_CONTRACTS, SUITE_CONTRACTS, load_artifact
from blendsm.contracts._deploy import Deployment
from blendsm.contracts._records import Policy, Role, Status
from blendsm.contracts._revert import chain_errors
from blendsm.errors import ChainError, ChainUnavailableError, ConfigError

__all__ = [
    "CallbackCursorStore",
    "ChainEvent",
    "Cursor",
    "CursorStore",
    "EventDecoder",
    "EventFollower",
    "FileCursorStore",
    "MemoryCursorStore",
]

_log = logging.getLogger("blendsm.contracts.events")

# Solidity enums in event arguments, decoded into ours (ABI internalType -> enum).
_ENUMS: dict[str, type[Role] | type[Status] | type[Policy]] = {
    "enum Registry.Role": Role,
    "enum Registry.Status": Status,
    "enum Market.Policy": Policy,
}


@dataclass(frozen=True, slots=True)
class ChainEvent:
    """One decoded log. ``args`` by Solidity name: addresses in checksum form, ``bytesN`` as
    bytes, enums as :class:`Role`/:class:`Status`/:class:`Policy`, integers as int."""

    contract: str
    event: str
    args: dict[str, Any]
    block_number: int
    log_index: int
    tx_hash: bytes
    address: str
    block_hash: bytes

    @property
    def position(self) -> tuple[int, int]:
        """(block number, log index): the order events are delivered in."""
        return (self.block_number, self.log_index)


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far a follower got: every block up to ``block`` is fully processed and, in block
    ``block + 1``, the logs with index <= ``log_index`` were delivered too (-1: none), so a
    follower stopped in the middle of a busy block resumes without repeats."""

    block: int
    log_index: int = -1

    def to_json(self) -> str:
        return json.dumps({"block": self.block, "log_index": self.log_index}) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Cursor:
        try:
            raw = json.loads(text)
            block, log_index = raw["block"], raw.get("log_index", -1)
            if (
                not isinstance(block, int)
                or not isinstance(log_index, int)
                or isinstance(block, bool)
            ):
                raise TypeError("block and log_index must be integers")
            if block < -1 or log_index < -1:
                raise ValueError("block and log_index must be >= -1")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"invalid event cursor: {exc}") from exc
        return cls(block, log_index)


class CursorStore(Protocol):
    """Where a follower keeps its cursor; ``save`` is awaited after each step."""

    async def load(self) -> Cursor | None: ...

    async def save(self, cursor: Cursor) -> None: ...


class MemoryCursorStore:
    """A cursor kept in memory: resumes across followers in one process, not across restarts."""

    def __init__(self, cursor: Cursor | None = None) -> None:
        self.cursor = cursor

    async def load(self) -> Cursor | None:
        return self.cursor

    async def save(self, cursor: Cursor) -> None:
        self.cursor = cursor


class CallbackCursorStore:
    """A cursor kept by your own functions (a database row next to the handler's effects)."""

    def __init__(
        self,
        load: Callable[[], Awaitable[Cursor | None]],
        save: Callable[[Cursor], Awaitable[None]],
    ) -> None:
        self._load = load
        self._save = save

    async def load(self) -> Cursor | None:
        return await self._load()

    async def save(self, cursor: Cursor) -> None:
        await self._save(cursor)


class FileCursorStore:
    """A cursor in a small JSON file, written atomically (temp file, fsync, rename) in a worker
    thread so the event loop never waits on the disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def load(self) -> Cursor | None:
        return await asyncio.to_thread(self._load)

    async def save(self, cursor: Cursor) -> None:
        await asyncio.to_thread(self._save, cursor)

    def _load(self) -> Cursor | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read event cursor file {self.path}: {exc}") from exc
        try:
            return Cursor.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from exc

    def _save(self, cursor: Cursor) -> None:
        atomic_write_text(self.path, cursor.to_json())


def _normalise(abi_type: str, internal_type: str, value: Any) -> Any:
    if abi_type == "address":
        return to_checksum_address(value)
    enum = _ENUMS.get(internal_type)
    if enum is not None:
        return enum(value)
    if isinstance(value, tuple):
        return list(value)
    return value


class EventDecoder:
    """Decodes logs of the suite's contracts; ``select`` chooses which events (see
    :class:`EventFollower`)."""

    def __init__(self, deployment: Deployment, select: Iterable[str] | None = None) -> None:
        by_contract: dict[str, dict[str, dict[str, Any]]] = {
            name: {
                item["name"]: item for item in load_artifact(name)["abi"] if item["type"] == "event"
            }
            for name in SUITE_CONTRACTS
            # a deployment older than a later contract (Brokers) has no events of it
            if name in deployment.addresses or name not in LATER_CONTRACTS
        }
        chosen = _select(by_contract, select)
        self.addresses: dict[str, str] = {}  # lower-case address -> contract name
        self._events: dict[tuple[str, bytes], tuple[str, dict[str, Any]]] = {}
        topics: set[bytes] = set()
        for contract, event in sorted(chosen):
            address = deployment.address(contract)
            self.addresses[address.lower()] = contract
            abi = by_contract[contract][event]
            topic = bytes(event_abi_to_log_topic(abi))  # type: ignore[arg-type]
            self._events[(contract, topic)] = (event, abi)
            topics.add(topic)
        self.topics = sorted(topics)

    def filter(self, from_block: int, to_block: int) -> FilterParams:
        """eth_getLogs parameters for the chosen events in [from_block, to_block]."""
        return {
            "fromBlock": from_block,
            "toBlock": to_block,
            "address": [to_checksum_address(a) for a in sorted(self.addresses)],
            "topics": [["0x" + t.hex() for t in self.topics]],
        }

    def decode(self, log: LogReceipt) -> ChainEvent | None:
        """The decoded event, None for a log we did not choose."""
        contract = self.addresses.get(str(log["address"]).lower())
        topics = [bytes(t) for t in log["topics"]]
        if contract is None or not topics:
            return None
        found = self._events.get((contract, topics[0]))
        if found is None:
            return None
        event, abi = found
        indexed = [i for i in abi["inputs"] if i["indexed"]]
        plain = [i for i in abi["inputs"] if not i["indexed"]]
        if len(indexed) != len(topics) - 1:
            raise ValueError(
                f"{contract}.{event}: expected {len(indexed)} indexed topics, got {len(topics) - 1}"
            )
        values: dict[str, Any] = {}
        for item, topic in zip(indexed, topics[1:], strict=True):
            if (
                item["type"] in ("string", "bytes")
                or item["type"].endswith("]")
                or item["type"].startswith("tuple")
            ):
                values[item["name"]] = topic  # a dynamic value is indexed by its hash
            else:
                values[item["name"]] = decode([item["type"]], topic)[0]
        data = decode([i["type"] for i in plain], bytes(log["data"]))
        values.update(zip((i["name"] for i in plain), data, strict=True))
        args = {
            i["name"]: _normalise(i["type"], i.get("internalType", ""), values[i["name"]])
            for i in abi["inputs"]
        }
        return ChainEvent(
            contract=contract,
            event=event,
            args=args,
            block_number=int(log["blockNumber"]),
            log_index=int(log["logIndex"]),
            tx_hash=bytes(log["transactionHash"]),
            address=to_checksum_address(log["address"]),
            block_hash=bytes(log["blockHash"]),
        )


def _select(
    by_contract: dict[str, dict[str, dict[str, Any]]], select: Iterable[str] | None
) -> set[tuple[str, str]]:
    every = {(c, e) for c, events in by_contract.items() for e in events}
    if select is None:
        return every
    chosen: set[tuple[str, str]] = set()
    for spec in select:
        contract, _, event = spec.partition(".")
        if event:
            if event not in by_contract.get(contract, {}):
                raise ConfigError(f"unknown event {spec!r}")
            chosen.add((contract, event))
        elif contract in by_contract:
            chosen |= {(contract, e) for e in by_contract[contract]}
        else:
            matches = {(c, e) for c, e in every if e == contract}
            if len(matches) != 1:
                raise ConfigError(f"unknown or ambiguous event {spec!r}; use 'Contract.Event'")
            chosen |= matches
    if not chosen:
        raise ConfigError("no events selected")
    return chosen


@dataclass(frozen=True, slots=True)
class _Batch:
    first: int
    last: int
    events: list[ChainEvent]
    caught_up: bool


class EventFollower:
    """Delivers the suite's events once each, ``confirmations`` blocks deep, in chain order.

    ``select``: None for every event of the suite's contracts, else names such as ``"Market"``
    (all its events), ``"PaymentChannels.ChannelOpened"`` or ``"ChannelOpened"``.
    ``start_block`` (default: the deployment block) applies when the store has no cursor.
    Use ``async for event in follower.events()`` (an event counts as delivered once yielded) or
    ``await follower.run(handler)`` (once the handler returned: a handler that raises ends
    ``run`` and its event comes again next time). :meth:`stop` ends either after the current step.
    """

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        deployment: Deployment,
        *,
        select: Iterable[str] | None = None,
        confirmations: int = 2,
        start_block: int | None = None,
        poll_interval: float = 0.5,
        max_range: int = 1_000,
        store: CursorStore | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 15.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if confirmations < 0:
            raise ConfigError("confirmations must be >= 0")
        if max_range < 1:
            raise ConfigError("max_range must be >= 1")
        if poll_interval <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ConfigError(
                "poll_interval and backoff_initial must be > 0, backoff_max >= backoff_initial"
            )
        self.w3 = w3
        self.deployment = deployment
        self.decoder = EventDecoder(deployment, select)
        self.confirmations = confirmations
        self.poll_interval = poll_interval
        self.max_range = max_range
        self.store: CursorStore = store if store is not None else MemoryCursorStore()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.log = logger or _log
        start = deployment.block if start_block is None else start_block
        self._position = Cursor(max(start, 0) - 1)
        self._loaded = False
        self._span = max_range
        self._stopping = asyncio.Event()
        self._failures = 0
        self._behind_warned = False

    @property
    def cursor(self) -> int:
        """The last fully processed block."""
        return self._position.block

    @property
    def position(self) -> Cursor:
        """The exact position (block and log index), as saved in the store."""
        return self._position

    @property
    def failures(self) -> int:
        """Consecutive failed polls (0 while the node answers)."""
        return self._failures

    def stop(self) -> None:
        """Ask :meth:`events` / :meth:`run` to end before the next event (or at once while
        waiting); asked before they start, they end at once."""
        self._stopping.set()

    async def events(self) -> AsyncIterator[ChainEvent]:
        """Every selected event, until :meth:`stop`; the cursor moves as each is yielded."""
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch in batches:
                for event in batch.events:
                    if self._stopping.is_set():
                        break
                    await self._advance(Cursor(event.block_number - 1, event.log_index))
                    yield event
                else:
                    await self._advance(Cursor(batch.last))
                    continue
                break
        self._stopping.clear()  # seen: a later events()/run() follows again

    async def run(self, handler: Callable[[ChainEvent], Awaitable[None] | None]) -> None:
        """Call ``handler`` (plain or async) for every selected event until :meth:`stop`; the
        cursor moves after each call returns, so an event whose handler raised comes again."""
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch in batches:
                for event in batch.events:
                    if self._stopping.is_set():
                        break
                    result = handler(event)
                    if inspect.isawaitable(result):
                        await result
                    await self._advance(Cursor(event.block_number - 1, event.log_index))
                else:
                    await self._advance(Cursor(batch.last))
                    continue
                break
        self._stopping.clear()  # seen: a later events()/run() follows again

    async def poll(self) -> list[ChainEvent]:
        """One step by hand: the events of the next confirmed range, delivered (the cursor
        moves past them). Empty when nothing new is deep enough; node errors propagate."""
        await self._load()
        batch = await self._fetch()
        if batch is None:
            return []
        self._position = Cursor(batch.last)
        await self.store.save(self._position)
        return batch.events

    async def _load(self) -> None:
        if not self._loaded:
            stored = await self.store.load()
            if stored is not None:
                self._position = stored
            self._loaded = True

    async def _advance(self, cursor: Cursor) -> None:
        if cursor != self._position:
            self._position = cursor
            await self.store.save(cursor)

    async def _batches(self) -> AsyncGenerator[_Batch, None]:
        await self._load()
        while not self._stopping.is_set():
            try:
                batch = await self._fetch()
            except Exception as exc:  # the node's fault: never end the follower for it
                self._failures += 1
                delay = self._backoff(self._failures)
                self.log.warning(
                    "event follower: chain poll failed (%d in a row), retrying from block %d in %.2fs: %s",
                    self._failures,
                    self.cursor + 1,
                    delay,
                    exc,
                    exc_info=not isinstance(exc, ChainUnavailableError),
                )
                await self._sleep(delay)
                continue
            if self._failures:
                self.log.info(
                    "event follower: chain answers again after %d failed polls", self._failures
                )
                self._failures = 0
            if batch is None:
                await self._sleep(self.poll_interval)
                continue
            yield batch
            if batch.caught_up:
                await self._sleep(self.poll_interval)

    async def _fetch(self) -> _Batch | None:
        with chain_errors("follow events: block number"):
            head = int(await self.w3.eth.block_number)
        safe = head - self.confirmations
        first = self._position.block + 1
        if safe < first:
            if head < self._position.block and not self._behind_warned:
                self._behind_warned = True
                self.log.warning(
                    "event follower: node head %d is behind the cursor %d (node lost its state, or a"
                    " reorg deeper than %d blocks); waiting, not rewinding",
                    head,
                    self._position.block,
                    self.confirmations,
                )
            return None
        self._behind_warned = False
        last = min(safe, first + self._span - 1)
        try:
            with chain_errors("follow events: get logs"):
                logs = await self.w3.eth.get_logs(self.decoder.filter(first, last))
        except ChainUnavailableError:
            raise
        except Exception:
            # A node may refuse a wide range (too many results): narrow it and retry.
            self._span = max(1, self._span // 2)
            raise
        self._span = min(self.max_range, self._span * 2)
        events: list[ChainEvent] = []
        for log in logs:
            if log.get("removed"):
                continue
            try:
                event = self.decoder.decode(log)
            except Exception:  # an ABI mismatch: retrying would stall the follower for good
                self.log.exception("event follower: cannot decode log %s; skipped", dict(log))
                continue
            if event is None:
                continue
            if event.block_number == first and event.log_index <= self._position.log_index:
                continue  # delivered before a stop in the middle of this block
            if not first <= event.block_number <= last:
                raise ChainError(
                    f"node returned a log of block {event.block_number} for range {first}..{last}"
                )
            events.append(event)
        events.sort(key=lambda e: e.position)
        return _Batch(first, last, events, caught_up=last == safe)

    def _backoff(self, failures: int) -> float:
        """Capped exponential with jitter (half fixed, half random), so many followers that
        lost the same node do not hammer it in step."""
        return backoff_delay(
            failures, base=self.backoff_initial, cap=self.backoff_max, jitter=Jitter.HALF
        )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
