"""Anchoring message leaves on chain, and the proofs that go with them.

Why: a subscriber must be able to show, without trusting the broker, that a message was
delivered as it was signed. Every market message becomes a leaf
(:func:`~blendsm.device_sdk.message_leaf`, double-hashed and binding the device signature);
leaves are batched by time or count into a Merkle tree (OpenZeppelin-compatible) and one
``DataAnchors.anchor`` transaction per batch puts its root on chain.

Durability rules this module enforces (the same patterns as the voucher store,
:mod:`blendsm.broker._store`):

* A leaf is on disk before :meth:`Anchorer.add` returns (``journal_mode=WAL``,
  ``synchronous=FULL``): the broker awaits it before it PUBACKs a QoS 1 publish. QoS 0
  leaves go through :meth:`Anchorer.add_nowait`, into the same group commit, not awaited.
  Concurrent adds share one transaction (one fsync), each caller resuming once its own row
  is durable.
* A batch is sealed write-ahead: in ONE transaction the oldest unbatched leaves get the
  next batch id and their positions, and the batch row (root, leaf count) is written in
  state ``intent``, before any transaction is signed. The anchor transaction's hash is
  committed (``sent``) before it is broadcast. So a batch never gets other leaves and its
  id and root never change.
* At most one batch is open (``intent`` or ``sent``) at a time: batch ids must grow strictly
  on chain, so a later batch anchored first would strand the earlier one.
* Reconciliation (at start, and whenever the fate of a transaction is unknown): the open
  batch is read back with ``anchorOf(operator, batch_id)``. The same root on chain means it
  is anchored (``confirmed``); no anchor means it is sent again under the SAME id and root;
  another root (or an id the chain has passed) means the id was used by something else:
  the batch is ``failed`` and its leaves return to the pool, to be sealed into a new batch.
  Hence no batch is anchored twice and no leaf is lost.

The chain being down never loses leaves: they keep accumulating on disk and the anchorer
retries with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound

from blendsm.broker._sqlite import DurableStore
from blendsm.contracts._bindings import AnchorInfo, Marketplace
from blendsm.contracts._revert import chain_errors
from blendsm.contracts._transactor import Transactor
from blendsm.device_sdk._control import AnchorNotice, Proof, ProofRequest, Refusal
from blendsm.device_sdk._envelope import Envelope
from blendsm.device_sdk._keccak import checksum_address
from blendsm.device_sdk._merkle import MerkleTree
from blendsm.errors import ChainError, ConfigError, ContractRevertError, StoreError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AnchorConfig",
    "AnchorRecord",
    "Anchorer",
    "AsyncLeafStore",
    "Batch",
    "BatchState",
    "LeafRow",
    "LeafStore",
    "ProofRecord",
]

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the schema below; a newer file is refused, not guessed at."""

APPLICATION_ID = 0x424C4C46
"""``PRAGMA application_id`` ("BLLF"), so another SQLite file (the voucher store) is told apart."""

BatchState = Literal["intent", "sent", "confirmed", "failed"]

_OPEN_STATES = ("intent", "sent")
_INT63 = 2**63 - 1
_UINT64_MAX = 2**64 - 1

_SCHEMA_V1 = """
CREATE TABLE batches (
    batch_id     INTEGER PRIMARY KEY,
    root         BLOB NOT NULL CHECK (length(root) = 32),
    leaf_count   INTEGER NOT NULL CHECK (leaf_count > 0),
    state        TEXT NOT NULL CHECK (state IN ('intent', 'sent', 'confirmed', 'failed')),
    tx_hash      BLOB CHECK (tx_hash IS NULL OR length(tx_hash) = 32),
    block_number INTEGER,
    gas_used     INTEGER,
    error        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);

CREATE TABLE leaves (
    leaf_index   INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT NOT NULL,
    device       BLOB NOT NULL CHECK (length(device) = 20),
    sequence     BLOB NOT NULL CHECK (length(sequence) = 8),   -- uint64 big-endian
    leaf         BLOB NOT NULL UNIQUE CHECK (length(leaf) = 32),
    envelope     BLOB NOT NULL,
    received_at  REAL NOT NULL,
    batch_id     INTEGER REFERENCES batches (batch_id),
    position     INTEGER,
    CHECK ((batch_id IS NULL) = (position IS NULL))
);

CREATE INDEX leaves_unbatched ON leaves (leaf_index) WHERE batch_id IS NULL;
CREATE INDEX leaves_by_message ON leaves (topic, sequence, device);
CREATE UNIQUE INDEX leaves_by_batch ON leaves (batch_id, position) WHERE batch_id IS NOT NULL;
CREATE INDEX batches_open ON batches (state) WHERE state IN ('intent', 'sent');
"""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LeafRow:
    """One message to anchor: where it came from, its leaf and the envelope (for audits)."""

    topic: str
    device: bytes
    """20 address bytes of the signing device."""
    sequence: int
    leaf: bytes
    envelope: bytes
    """The envelope's wire bytes, kept so a proof can be audited against the message."""
    received_at: float

    @classmethod
    def of(
        cls, topic: str, envelope: Envelope, leaf: bytes, received_at: float | None = None
    ) -> LeafRow:
        return cls(
            topic,
            envelope.device,
            envelope.sequence,
            leaf,
            envelope.encode(),
            time.time() if received_at is None else received_at,
        )

    def check(self) -> None:
        """Raise StoreError if a field cannot be stored (so it fails its caller alone)."""
        if not isinstance(self.topic, str) or not self.topic:
            raise StoreError("leaf: topic must be a non-empty string")
        if not isinstance(self.device, bytes) or len(self.device) != 20:
            raise StoreError("leaf: device must be 20 bytes")
        if not isinstance(self.leaf, bytes) or len(self.leaf) != 32:
            raise StoreError("leaf: leaf must be 32 bytes")
        if not 0 <= self.sequence <= _UINT64_MAX:
            raise StoreError("leaf: sequence must fit uint64")
        if not isinstance(self.envelope, bytes):
            raise StoreError("leaf: envelope must be bytes")


@dataclass(frozen=True, slots=True)
class Batch:
    """A sealed batch: its id, root and leaf count never change once written."""

    batch_id: int
    root: bytes
    leaf_count: int
    state: BatchState
    tx_hash: bytes | None
    created_at: float


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """A batch root anchored on chain (``tx_hash`` None if found by reconciling without it)."""

    batch_id: int
    root: bytes
    leaf_count: int
    tx_hash: bytes | None
    block: int | None

    def notice(self) -> AnchorNotice:
        """The notice to broadcast on :data:`~blendsm.device_sdk.ANCHORS_TOPIC`."""
        return AnchorNotice(self.batch_id, self.root, self.leaf_count, self.tx_hash)


@dataclass(frozen=True, slots=True)
class ProofRecord:
    """A message's leaf, its proof and the anchored batch it is in."""

    topic: str
    sequence: int
    device: str
    """Checksum address of the signing device."""
    leaf: bytes
    proof: tuple[bytes, ...]
    batch_id: int
    root: bytes
    tx_hash: bytes | None
    index: int
    """The leaf's position in the batch."""
    leaf_count: int
    block: int | None
    envelope: bytes
    """The envelope's wire bytes, as received."""

    def notice(self, request_id: str) -> Proof:
        """The :class:`~blendsm.device_sdk.Proof` notice answering ``request_id``."""
        return Proof(
            request_id=request_id,
            topic=self.topic,
            sequence=self.sequence,
            device=self.device,
            leaf=self.leaf,
            proof=self.proof,
            batch_id=self.batch_id,
            root=self.root,
            tx_hash=self.tx_hash,
            index=self.index,
        )


@dataclass(frozen=True, slots=True)
class AnchorConfig:
    """When leaves are anchored: every ``batch_seconds`` (counted from the oldest pending
    leaf) or as soon as ``batch_max_leaves`` are pending, whichever comes first."""

    batch_seconds: float = 60.0
    batch_max_leaves: int = 1000
    confirmations: int = 0
    """Blocks on top of the anchor's block before it counts (and its proofs are handed out)."""
    backoff_base: float = 1.0
    backoff_max: float = 300.0

    def __post_init__(self) -> None:
        if not self.batch_seconds > 0:
            raise ConfigError("anchors.batch_seconds: must be > 0")
        if not 1 <= self.batch_max_leaves <= 2**20:
            raise ConfigError("anchors.batch_max_leaves: must be in [1, 2**20]")
        if self.confirmations < 0:
            raise ConfigError("anchors.confirmations: must be >= 0")
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ConfigError("anchors: need 0 < backoff_base <= backoff_max")


# --------------------------------------------------------------------------- blocking store


class LeafStore(DurableStore):
    """Blocking leaf and batch store (one SQLite file); use it from one thread (the async
    facade guarantees that)."""

    def __init__(self, path: str | Path, *, tree_cache: int = 8) -> None:
        super().__init__(
            path,
            kind="leaf store",
            application_id=APPLICATION_ID,
            schema_version=SCHEMA_VERSION,
            schema=_SCHEMA_V1,
        )
        self._trees: OrderedDict[int, MerkleTree] = OrderedDict()
        self._tree_cache = tree_cache

    # -- leaves --------------------------------------------------------------

    def add_many(self, rows: Sequence[LeafRow]) -> list[bool]:
        """Store every row in ONE transaction (one fsync); per row, True if it was new
        (a leaf already stored, e.g. a QoS 1 retransmission, is kept once)."""
        for row in rows:
            row.check()
        if not rows:
            return []

        def body() -> list[bool]:
            return [
                self._db.execute(
                    "INSERT INTO leaves (topic, device, sequence, leaf, envelope, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (leaf) DO NOTHING",
                    (
                        r.topic,
                        r.device,
                        r.sequence.to_bytes(8, "big"),
                        r.leaf,
                        r.envelope,
                        r.received_at,
                    ),
                ).rowcount
                == 1
                for r in rows
            ]

        return self._write(body)

    def pending(self) -> tuple[int, float | None]:
        """``(count, received_at of the oldest)`` of the leaves not in any batch yet."""
        count, oldest = self._db.execute(
            "SELECT count(*), min(received_at) FROM leaves WHERE batch_id IS NULL"
        ).fetchone()
        return int(count), oldest

    def leaf_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM leaves").fetchone()[0])

    # -- batches -------------------------------------------------------------

    def open_batch(self) -> Batch | None:
        """The batch in state ``intent`` or ``sent``, if any (at most one exists)."""
        row = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " WHERE state IN ('intent', 'sent') ORDER BY batch_id LIMIT 1"
        ).fetchone()
        return None if row is None else Batch(*row)

    def batch(self, batch_id: int) -> Batch | None:
        row = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " WHERE batch_id = ?",
            (batch_id,),
        ).fetchone()
        return None if row is None else Batch(*row)

    def batches(self) -> list[Batch]:
        """Every batch, in id order (for audits and tests)."""
        rows = self._db.execute(
            "SELECT batch_id, root, leaf_count, state, tx_hash, created_at FROM batches"
            " ORDER BY batch_id"
        ).fetchall()
        return [Batch(*r) for r in rows]

    def last_batch_id(self) -> int:
        """The highest batch id ever sealed here (failed ones included), 0 if none."""
        return int(self._db.execute("SELECT coalesce(max(batch_id), 0) FROM batches").fetchone()[0])

    def seal_batch(
        self, max_leaves: int, chain_latest: int = 0, now: float | None = None
    ) -> Batch | None:
        """Seal the oldest unbatched leaves (at most ``max_leaves``) into a new batch, or
        None if there are none. Its id is ``max(last local id, chain_latest) + 1``
        (``chain_latest`` is the operator's ``latestBatchId`` on chain). Write-ahead: the
        batch row (state ``intent``) and every leaf's batch id and position commit together,
        before anything is sent. Refused (StoreError) while another batch is open."""
        if max_leaves < 1:
            raise StoreError("seal_batch: max_leaves must be >= 1")
        at = time.time() if now is None else now

        def body() -> Batch | None:
            if self.open_batch() is not None:
                raise StoreError("seal_batch: a batch is still open; resolve it first")
            rows = self._db.execute(
                "SELECT leaf_index, leaf FROM leaves WHERE batch_id IS NULL"
                " ORDER BY leaf_index LIMIT ?",
                (max_leaves,),
            ).fetchall()
            if not rows:
                return None
            batch_id = max(self.last_batch_id(), chain_latest) + 1
            if batch_id > _INT63:
                raise StoreError(f"seal_batch: batch id {batch_id} does not fit the store")
            tree = MerkleTree([r[1] for r in rows])
            self._db.execute(
                "INSERT INTO batches (batch_id, root, leaf_count, state, created_at, updated_at)"
                " VALUES (?, ?, ?, 'intent', ?, ?)",
                (batch_id, tree.root, len(rows), at, at),
            )
            self._db.executemany(
                "UPDATE leaves SET batch_id = ?, position = ? WHERE leaf_index = ?",
                [(batch_id, pos, r[0]) for pos, r in enumerate(rows)],
            )
            self._remember(batch_id, tree)
            return Batch(batch_id, tree.root, len(rows), "intent", None, at)

        return self._write(body)

    def _move(
        self,
        batch_id: int,
        allowed: tuple[str, ...],
        target: BatchState,
        assignments: str,
        params: tuple[object, ...],
    ) -> None:
        row = self._db.execute(
            "SELECT state FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"batch {batch_id} does not exist")
        if row[0] not in allowed:
            raise StoreError(f"batch {batch_id} is {row[0]!r}, cannot become {target!r}")
        self._db.execute(
            f"UPDATE batches SET state = ?, updated_at = ?, {assignments} WHERE batch_id = ?",
            (target, time.time(), *params, batch_id),
        )

    def mark_sent(self, batch_id: int, tx_hash: bytes) -> None:
        """The anchor transaction is about to be broadcast as ``tx_hash`` (write-ahead).
        Valid again from ``sent`` (a resend after reconciling signs a new transaction)."""
        self._write(lambda: self._move(batch_id, _OPEN_STATES, "sent", "tx_hash = ?", (tx_hash,)))

    def mark_confirmed(
        self,
        batch_id: int,
        tx_hash: bytes | None,
        block_number: int | None,
        gas_used: int | None = None,
    ) -> None:
        """The batch's root is on chain (deep enough); its proofs may be handed out."""
        self._write(
            lambda: self._move(
                batch_id,
                (*_OPEN_STATES, "confirmed"),
                "confirmed",
                "tx_hash = coalesce(?, tx_hash), block_number = ?, gas_used = ?, error = NULL",
                (tx_hash, block_number, gas_used),
            )
        )

    def mark_failed(self, batch_id: int, error: str) -> None:
        """The batch id cannot carry this root on chain (taken by another root, or passed):
        fail it and return its leaves to the pool, to be sealed into a new batch."""

        def body() -> None:
            self._move(batch_id, _OPEN_STATES, "failed", "error = ?", (error,))
            self._db.execute(
                "UPDATE leaves SET batch_id = NULL, position = NULL WHERE batch_id = ?",
                (batch_id,),
            )
            self._trees.pop(batch_id, None)

        self._write(body)

    # -- proofs --------------------------------------------------------------

    def _remember(self, batch_id: int, tree: MerkleTree) -> None:
        self._trees[batch_id] = tree
        self._trees.move_to_end(batch_id)
        while len(self._trees) > self._tree_cache:
            self._trees.popitem(last=False)

    def _tree(self, batch_id: int) -> MerkleTree:
        tree = self._trees.get(batch_id)
        if tree is None:
            leaves = [
                r[0]
                for r in self._db.execute(
                    "SELECT leaf FROM leaves WHERE batch_id = ? ORDER BY position", (batch_id,)
                )
            ]
            tree = MerkleTree(leaves)
        self._remember(batch_id, tree)
        return tree

    _PROOF_SELECT = (
        "SELECT l.topic, l.sequence, l.device, l.leaf, l.batch_id, l.position, l.envelope,"
        " b.root, b.leaf_count, b.tx_hash, b.block_number"
        " FROM leaves l JOIN batches b ON b.batch_id = l.batch_id"
        " WHERE b.state = 'confirmed' AND "
    )

    def _proof(self, row: Any) -> ProofRecord:
        topic, seq, device, leaf, batch_id, position, envelope, root, count, tx, block = row
        tree = self._tree(batch_id)
        if tree.root != root:  # the store was altered behind our back: never hand it out
            raise StoreError(f"batch {batch_id}: stored leaves do not give the anchored root")
        return ProofRecord(
            topic=topic,
            sequence=int.from_bytes(seq, "big"),
            device=checksum_address(device),
            leaf=leaf,
            proof=tuple(tree.proof(position)),
            batch_id=batch_id,
            root=root,
            tx_hash=tx,
            index=position,
            leaf_count=count,
            block=block,
            envelope=envelope,
        )

    def proof_for(self, topic: str, device: bytes | None, sequence: int) -> ProofRecord | None:
        """The proof of the message ``sequence`` on ``topic`` (by ``device`` if given, else
        the first such message stored), None unless it is in a confirmed batch."""
        if not 0 <= sequence <= _UINT64_MAX:
            return None
        sql = self._PROOF_SELECT + "l.topic = ? AND l.sequence = ?"
        params: tuple[object, ...] = (topic, sequence.to_bytes(8, "big"))
        if device is not None:
            sql += " AND l.device = ?"
            params += (device,)
        row = self._db.execute(sql + " ORDER BY l.leaf_index LIMIT 1", params).fetchone()
        return None if row is None else self._proof(row)

    def proof_for_leaf(self, leaf: bytes) -> ProofRecord | None:
        """The proof of the message whose leaf hash is ``leaf``, None unless anchored."""
        row = self._db.execute(self._PROOF_SELECT + "l.leaf = ?", (leaf,)).fetchone()
        return None if row is None else self._proof(row)


# --------------------------------------------------------------------------- async facade

NOWAIT_LINGER: Final = 0.02
"""Seconds QoS 0 leaves (``add_nowait``) may wait to share a commit: the profile in
docs/benchmarks.md found about 1.5 leaves per fsync without it. A crash can lose that window of
QoS 0 leaves, which ``add_nowait`` never promised to keep."""
NOWAIT_GROUP: Final = 256
"""Queued leaves that commit at once, lingering or not."""


class AsyncLeafStore:
    """Asyncio facade: every call runs on one dedicated thread that owns the connection;
    :meth:`add` group-commits (concurrent adds share one transaction)."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        store: LeafStore,
        logger: logging.Logger | None = None,
    ) -> None:
        self._executor = executor
        self._store = store
        self.log = logger or logging.getLogger("blendsm.broker.anchors")
        self._queue: list[tuple[LeafRow, asyncio.Future[bool] | None]] = []
        self._waiters = 0
        """Awaited adds (QoS 1/2, a PUBACK waits on them) in ``_queue``."""
        self._wake = asyncio.Event()
        self._draining = 0
        self._flusher: asyncio.Task[None] | None = None
        self.linger = NOWAIT_LINGER
        """Seconds a group of only not-awaited (QoS 0) leaves may wait for more before its
        commit; an awaited add or ``NOWAIT_GROUP`` queued leaves commit at once."""
        self.lost = 0
        """Not-awaited (QoS 0) leaves whose transaction failed; logged, counted here."""
        self.on_durable: Callable[[int], None] | None = None
        """Called on the loop with the number of NEW leaves after each group commit."""

    @classmethod
    async def open(cls, path: str | Path, logger: logging.Logger | None = None) -> AsyncLeafStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blendsm-leaves")
        try:
            store = await asyncio.get_running_loop().run_in_executor(executor, LeafStore, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, store, logger)

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def commits(self) -> int:
        return self._store.commits

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _enqueue(self, row: LeafRow, done: asyncio.Future[bool] | None) -> None:
        row.check()  # bad input fails its caller alone, not a group
        self._queue.append((row, done))
        if done is not None:
            self._waiters += 1
        if done is not None or len(self._queue) >= NOWAIT_GROUP:
            self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="blendsm-leaves-group-commit"
            )

    async def add(self, row: LeafRow) -> bool:
        """Store ``row``; returns once the transaction holding it committed (True if new)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(row, done)
        return await done

    def add_nowait(self, row: LeafRow) -> None:
        """Queue ``row`` for the next group commit without waiting (call on the loop)."""
        self._enqueue(row, None)

    async def _flush(self) -> None:
        while self._queue:
            if (
                not self._waiters
                and not self._draining
                and len(self._queue) < NOWAIT_GROUP
                and self.linger > 0
            ):
                # Only QoS 0 leaves: nobody waits on them, so gather more per fsync.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._wake.wait()
            batch, self._queue = self._queue, []
            self._waiters = 0
            try:
                results = await self._run(self._store.add_many, [r for r, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if done is None:
                        self.lost += 1
                    elif not done.done():
                        done.set_exception(exc)
                if any(done is None for _, done in batch):
                    self.log.error("anchors: could not store %d leaves: %s", len(batch), exc)
                continue
            except BaseException:
                for _, done in batch + self._queue:
                    if done is not None:
                        done.cancel()
                raise
            for (_, done), result in zip(batch, results, strict=True):
                if done is not None and not done.done():
                    done.set_result(result)
            if self.on_durable is not None:
                self.on_durable(sum(results))

    async def drain(self) -> None:
        """Commit every queued add now (no lingering) and wait for it (or its failure)."""
        self._draining += 1
        self._wake.set()
        try:
            while self._flusher is not None and not self._flusher.done():
                await asyncio.gather(self._flusher, return_exceptions=True)
        finally:
            self._draining -= 1

    async def add_many(self, rows: Sequence[LeafRow]) -> list[bool]:
        return await self._run(self._store.add_many, list(rows))

    async def pending(self) -> tuple[int, float | None]:
        return await self._run(self._store.pending)

    async def leaf_count(self) -> int:
        return await self._run(self._store.leaf_count)

    async def open_batch(self) -> Batch | None:
        return await self._run(self._store.open_batch)

    async def batch(self, batch_id: int) -> Batch | None:
        return await self._run(self._store.batch, batch_id)

    async def batches(self) -> list[Batch]:
        return await self._run(self._store.batches)

    async def last_batch_id(self) -> int:
        return await self._run(self._store.last_batch_id)

    async def seal_batch(
        self, max_leaves: int, chain_latest: int = 0, now: float | None = None
    ) -> Batch | None:
        return await self._run(self._store.seal_batch, max_leaves, chain_latest, now)

    async def mark_sent(self, batch_id: int, tx_hash: bytes) -> None:
        await self._run(self._store.mark_sent, batch_id, tx_hash)

    async def mark_confirmed(
        self,
        batch_id: int,
        tx_hash: bytes | None,
        block_number: int | None,
        gas_used: int | None = None,
    ) -> None:
        await self._run(self._store.mark_confirmed, batch_id, tx_hash, block_number, gas_used)

    async def mark_failed(self, batch_id: int, error: str) -> None:
        await self._run(self._store.mark_failed, batch_id, error)

    async def proof_for(
        self, topic: str, device: bytes | None, sequence: int
    ) -> ProofRecord | None:
        return await self._run(self._store.proof_for, topic, device, sequence)

    async def proof_for_leaf(self, leaf: bytes) -> ProofRecord | None:
        return await self._run(self._store.proof_for_leaf, leaf)

    async def close(self) -> None:
        """Finish queued adds, close the connection on its own thread, stop the thread."""
        await self.drain()
        try:
            await self._run(self._store.close)
        finally:
            self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- anchorer


class _PendingError(ChainError):
    """The batch's fate is not known yet (not mined, not deep enough); try again later."""


class Anchorer:
    """Batches leaves and anchors each batch's root with one transaction, exactly once.

    ``marketplace`` signs as the broker operator, who must hold an active Operator role in
    the Registry. ``on_anchored`` is called (on the loop) for every batch confirmed,
    reconciled ones included: the broker publishes an anchor notice from it.
    """

    def __init__(
        self,
        store: AsyncLeafStore,
        marketplace: Marketplace,
        config: AnchorConfig | None = None,
        *,
        logger: logging.Logger | None = None,
        on_anchored: Callable[[AnchorRecord], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if marketplace.transactor is None:
            raise ConfigError("anchors: the marketplace must sign as the broker operator")
        self.store = store
        self.marketplace = marketplace
        self.transactor: Transactor = marketplace.transactor
        self.operator = self.transactor.address
        self.config = config or AnchorConfig()
        self.log = logger or logging.getLogger("blendsm.broker.anchors")
        self.on_anchored = on_anchored
        self.clock = clock
        # counters
        self.leaves = 0
        """Leaves made durable through this anchorer."""
        self.batches_anchored = 0
        """Batches confirmed on chain by this anchorer (reconciled ones included)."""
        self.gas_used = 0
        """Gas of the anchor transactions this anchorer saw mined."""
        self.last_batch_id = 0
        """Id of the last batch confirmed."""
        self.failures = 0
        """Anchor attempts that failed (node unreachable, reverted, ...)."""
        # state
        self._pending = 0
        self._oldest: float | None = None
        self._loaded = False
        self._errors = 0
        self._retry_at = 0.0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        store.on_durable = self._durable

    # --- adding leaves -------------------------------------------------------------------

    def _durable(self, new: int) -> None:
        self.leaves += new
        if new and self._oldest is None:
            self._oldest = self.clock()
        self._pending += new
        if self._pending >= self.config.batch_max_leaves:
            self._wake.set()

    async def add(self, topic: str, envelope: Envelope, leaf: bytes) -> None:
        """Store the message's leaf; durable on return (await it before a QoS 1 PUBACK)."""
        await self.store.add(LeafRow.of(topic, envelope, leaf, self.clock()))

    def add_nowait(self, topic: str, envelope: Envelope, leaf: bytes) -> None:
        """Queue the leaf for the next group commit, not awaited (QoS 0)."""
        self.store.add_nowait(LeafRow.of(topic, envelope, leaf, self.clock()))

    # --- proofs --------------------------------------------------------------------------

    async def proof(
        self, topic: str, sequence: int, device: str | bytes | None = None
    ) -> ProofRecord | None:
        """The proof of message ``sequence`` on ``topic`` (from ``device``), None while it
        is not anchored (or unknown)."""
        raw = None
        if isinstance(device, str):
            try:
                raw = bytes.fromhex(device.removeprefix("0x"))
            except ValueError:
                return None
        elif device is not None:
            raw = bytes(device)
        if raw is not None and len(raw) != 20:
            return None
        return await self.store.proof_for(topic, raw, sequence)

    async def proof_by_leaf(self, leaf: bytes) -> ProofRecord | None:
        """The proof of the message whose leaf hash is ``leaf``, None while not anchored."""
        if len(leaf) != 32:
            return None
        return await self.store.proof_for_leaf(leaf)

    async def answer(self, request: ProofRequest) -> Proof | Refusal:
        """The notice answering a client's proof request: the :class:`Proof`, or a
        ``proof_unavailable`` refusal while the message is unknown or not anchored yet.
        By leaf when the request names one, else by topic, sequence (and device)."""
        record: ProofRecord | None = None
        if request.leaf is not None:
            record = await self.proof_by_leaf(request.leaf)
        elif request.topic is not None and request.sequence is not None:
            record = await self.proof(request.topic, request.sequence, request.device)
        if record is None:
            return Refusal(
                "proof_unavailable",
                "message unknown or not anchored yet; ask again after its anchor notice",
                request_id=request.request_id,
            )
        return record.notice(request.request_id)

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile the open batch, then anchor by count and time until :meth:`stop`.
        Never raises for chain or store trouble: it logs and retries with backoff."""
        self._stopping.clear()
        while not self._stopping.is_set():
            delay = self.config.batch_seconds
            now = self.clock()
            if now >= self._retry_at:
                try:
                    async with self._lock:
                        await self._load()
                        delay = await self._step()
                except _PendingError as exc:  # not a failure: look again shortly
                    self.log.debug("anchors: %s", exc)
                    delay = self.config.backoff_base
                except Exception as exc:
                    delay = self._failed(exc)
            else:
                delay = self._retry_at - now
            await self._sleep(delay)

    def stop(self) -> None:
        """End :meth:`run` after the current step."""
        self._stopping.set()
        self._wake.set()

    async def anchor_now(self) -> list[AnchorRecord]:
        """Seal and anchor everything pending now (shutdown, tests, demos). Raises
        ChainError if the chain cannot take it (the leaves stay on disk, for next time)."""
        await self.store.drain()
        records: list[AnchorRecord] = []
        async with self._lock:
            await self._load()
            while True:
                batch = await self.store.open_batch()
                if batch is not None:
                    record = await self._anchor(batch)
                    if record is not None:
                        records.append(record)
                    continue
                count, _ = await self.store.pending()
                if count == 0:
                    return records
                if await self._seal() is None:
                    return records

    async def reconcile(self) -> AnchorRecord | None:
        """Resolve the open batch (if any) from the chain: confirmed if its root is there,
        sent again under the same id if absent, failed (leaves back to the pool) if the id
        carries another root. Raises ChainError if the node cannot be reached."""
        async with self._lock:
            batch = await self.store.open_batch()
            if batch is None:
                return None
            return await self._anchor(batch)

    async def _load(self) -> None:
        if self._loaded:
            return
        await self.store.drain()
        count, oldest = await self.store.pending()
        self._pending = count
        if count and oldest is not None:
            self._oldest = min(oldest, self.clock())
        self._loaded = True

    async def _step(self) -> float:
        """One round: finish the open batch, else seal one when due. Returns the delay."""
        batch = await self.store.open_batch()
        if batch is not None:
            await self._anchor(batch)
            self._errors = 0
            return 0.0
        cfg = self.config
        now = self.clock()
        due = self._pending >= cfg.batch_max_leaves or (
            self._pending > 0
            and self._oldest is not None
            and now - self._oldest >= cfg.batch_seconds
        )
        if not due:
            if self._pending and self._oldest is not None:
                return max(0.0, self._oldest + cfg.batch_seconds - now)
            return cfg.batch_seconds
        if await self._seal() is None:
            return cfg.batch_seconds
        return 0.0

    async def _seal(self) -> Batch | None:
        chain_latest = await self.marketplace.anchors.latest_batch_id(self.operator)
        batch = await self.store.seal_batch(
            self.config.batch_max_leaves, chain_latest, self.clock()
        )
        count, oldest = await self.store.pending()
        self._pending = count
        self._oldest = None if count == 0 else min(oldest or self.clock(), self.clock())
        if batch is not None:
            self.log.info(
                "anchors: sealed batch %d (%d leaves, root %s)",
                batch.batch_id,
                batch.leaf_count,
                batch.root.hex(),
            )
        return batch

    def _failed(self, exc: BaseException) -> float:
        self._errors += 1
        self.failures += 1
        cfg = self.config
        delay = min(cfg.backoff_max, cfg.backoff_base * 2.0 ** min(self._errors - 1, 30))
        self._retry_at = self.clock() + delay
        self.log.warning(
            "anchors: anchoring failed (%d in a row), retrying in %.2fs: %s",
            self._errors,
            delay,
            exc,
        )
        return delay

    async def _sleep(self, seconds: float) -> None:
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        self._wake.clear()

    # --- anchoring -----------------------------------------------------------------------

    async def _anchor(self, batch: Batch) -> AnchorRecord | None:
        """Bring the open ``batch`` to confirmed (or failed): reconcile with the chain
        first, send only if its id carries no anchor. Raises ChainError / _PendingError when its
        fate cannot be decided now (it stays open)."""
        info = await self.marketplace.anchors.anchor_of(self.operator, batch.batch_id)
        if info is not None:
            return await self._settle(batch, info, None)
        if batch.tx_hash is not None and await self._in_mempool(batch.tx_hash):
            raise _PendingError(
                f"batch {batch.batch_id}: transaction {batch.tx_hash.hex()} pending"
            )
        latest = await self.marketplace.anchors.latest_batch_id(self.operator)
        if latest >= batch.batch_id:
            await self._fail(batch, f"batch id {batch.batch_id} passed on chain (latest {latest})")
            return None
        call = self.marketplace.anchors.contract.functions.anchor(
            batch.batch_id, batch.root, batch.leaf_count
        )
        batch_id = batch.batch_id

        async def record(tx_hash: bytes) -> None:
            await self.store.mark_sent(batch_id, tx_hash)

        try:
            tx_hash = await self.transactor.submit(call, before_send=record)
        except ContractRevertError as exc:
            if exc.error_name == "DataAnchorsBatchIdNotIncreasing":
                # Raced by another anchor under our key: the chain decides next round.
                raise ChainError(f"batch {batch_id}: {exc}") from exc
            raise
        receipt = await self.transactor.wait(tx_hash, call)
        gas = int(receipt["gasUsed"])
        self.gas_used += gas
        self.log.info("anchors: batch %d sent as %s (gas %d)", batch_id, bytes(tx_hash).hex(), gas)
        info = await self.marketplace.anchors.anchor_of(self.operator, batch_id)
        if info is None:
            raise ChainError(f"batch {batch_id}: mined but anchorOf is empty (reorg?)")
        return await self._settle(batch, info, bytes(tx_hash), gas)

    async def _settle(
        self, batch: Batch, info: AnchorInfo, tx_hash: bytes | None, gas: int | None = None
    ) -> AnchorRecord | None:
        """The chain holds an anchor under the batch's id: ours if the root matches."""
        if info.root != batch.root or info.leaf_count != batch.leaf_count:
            await self._fail(
                batch,
                f"batch id {batch.batch_id} carries another root on chain ({info.root.hex()})",
            )
            return None
        if self.config.confirmations:
            with chain_errors("anchors: block number"):
                head = int(await self.marketplace.w3.eth.block_number)
            if head < info.block_number + self.config.confirmations:
                raise _PendingError(
                    f"batch {batch.batch_id}: block {info.block_number} has"
                    f" {head - info.block_number} of {self.config.confirmations} confirmations"
                )
        if tx_hash is None:
            tx_hash = batch.tx_hash if batch.state == "sent" else None
            found = await self._find_tx(batch.batch_id, info.block_number)
            tx_hash = found or tx_hash
        await self.store.mark_confirmed(batch.batch_id, tx_hash, info.block_number, gas)
        self.batches_anchored += 1
        self.last_batch_id = max(self.last_batch_id, batch.batch_id)
        record = AnchorRecord(
            batch.batch_id, batch.root, batch.leaf_count, tx_hash, info.block_number
        )
        self.log.info(
            "anchors: batch %d anchored (%d leaves, block %d)",
            batch.batch_id,
            batch.leaf_count,
            info.block_number,
        )
        if self.on_anchored is not None:
            try:
                self.on_anchored(record)
            except Exception:
                self.log.exception("anchors: on_anchored callback failed")
        return record

    async def _fail(self, batch: Batch, why: str) -> None:
        self.log.warning(
            "anchors: batch %d failed, its leaves go to a new batch: %s", batch.batch_id, why
        )
        await self.store.mark_failed(batch.batch_id, why)
        count, oldest = await self.store.pending()
        self._pending = count
        self._oldest = None if count == 0 else oldest

    async def _in_mempool(self, tx_hash: bytes) -> bool:
        """Whether the node still knows an unmined ``tx_hash`` (then wait, do not resend)."""
        w3 = self.marketplace.w3
        with chain_errors("anchors: transaction lookup"):
            try:
                receipt = await w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            except TransactionNotFound:
                receipt = None
            if receipt is not None:
                return False  # mined (reverted, since anchorOf is empty): resend
            try:
                await w3.eth.get_transaction(HexBytes(tx_hash))
            except TransactionNotFound:
                return False
            return True

    async def _find_tx(self, batch_id: int, block: int) -> bytes | None:
        """The hash of the transaction that anchored ``batch_id`` (from its Anchored log)."""
        try:
            with chain_errors("anchors: Anchored log"):
                logs = await self.marketplace.anchors.contract.events.Anchored().get_logs(
                    argument_filters={"broker": self.operator, "batchId": batch_id},
                    from_block=block,
                    to_block=block,
                )
        except ChainError as exc:
            self.log.debug("anchors: cannot read the Anchored log of %d: %s", batch_id, exc)
            return None
        return bytes(logs[0]["transactionHash"]) if logs else None
