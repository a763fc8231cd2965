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

Where the parts live: the durable leaf and batch store in :mod:`blendsm.broker._leaf_store`,
the records passed around (leaf rows, batches, anchor and proof records) in
:mod:`blendsm.broker._anchor_records`, its settings (:class:`AnchorConfig`, re-exported here)
in :mod:`blendsm.broker._anchor_config`, the :class:`Anchorer` loop here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from blendsm import backoff_delay
from blendsm.broker._anchor_budget import AnchorBudget
from blendsm.broker._anchor_config import AnchorConfig
from blendsm.broker._anchor_records import AnchorRecord, Batch, LeafRow, ProofRecord
from blendsm.broker._leaf_store import AsyncLeafStore
from blendsm.broker._tx_watch import confirmations_missing, find_transaction
from blendsm.contracts import Marketplace, Transactor, chain_errors
from blendsm.device_sdk import Envelope, Proof, ProofRequest, Refusal
from blendsm.errors import ChainError, ConfigError, ContractRevertError

__all__ = ["AnchorConfig", "Anchorer"]

# --------------------------------------------------------------------------- anchorer


class _PendingError(ChainError):
    """The batch's fate is not known yet (not mined, not deep enough); try again later."""


class Anchorer:
    """Batches leaves and anchors each batch's root with one transaction, exactly once.

    ``marketplace`` signs as the broker operator, who must hold an active Operator role in
    the Registry. ``on_anchored`` is called (on the loop) for every batch confirmed,
    reconciled ones included: the broker publishes an anchor notice from it.
    ``seller_of(topic)`` names the seller whose leaf budget a topic's leaves count against
    (default: each topic its own); :meth:`delivered` is told of every market delivery.
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
        seller_of: Callable[[str], str | None] | None = None,
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
        cfg = self.config
        self.budget = AnchorBudget(
            batch_seconds=cfg.batch_seconds,
            batch_max_leaves=cfg.batch_max_leaves,
            max_roots_per_hour=cfg.max_roots_per_hour,
            spacing=cfg.root_spacing_seconds,
            unsold_batch_seconds=cfg.unsold_batch_seconds,
            max_pending_leaves_per_seller=cfg.max_pending_leaves_per_seller,
            seller_of=seller_of or (lambda topic: None),
            logger=self.log,
        )
        """Triggers and ceilings: sold marks, pending leaves per seller, roots per hour."""
        # state
        self._pending = 0
        self._oldest: float | None = None
        self._loaded = False
        self._errors = 0
        self._retry_at = 0.0
        self._lock = asyncio.Lock()
        self._paced = False  # True while run()'s background step holds the lock
        self._fresh: int | None = None  # the batch this anchorer sealed last, until sent
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        store.on_durable = self._durable

    # --- adding leaves -------------------------------------------------------------------

    def _durable(self, new: int) -> None:
        self.leaves += new
        if new and self._oldest is None:
            self._oldest = self.clock()
        self._pending += new
        budget = self.budget
        if budget.everything_sold and self._pending >= budget.batch_max_leaves:
            self._wake_unless_capped()

    @property
    def anchors_deferred(self) -> int:
        """Times a due root waited for ``max_roots_per_hour``."""
        return self.budget.deferred

    @property
    def leaves_refused(self) -> int:
        """Leaves refused: their seller had ``max_pending_leaves_per_seller`` waiting."""
        return self.budget.refused

    def delivered(self, topic: str) -> None:
        """A message of market ``topic`` was delivered (charged, or free): its leaves so far
        are sold and drive anchoring (the meter's and the gate's hook)."""
        if self.budget.delivered(topic, self.clock()):
            self._wake_unless_capped()

    def _reserve(self, topic: str) -> float:
        """Count the leaf against its seller's budget (raises LeafBudgetError); its time."""
        now = self.clock()
        if self.budget.reserve(topic, now):
            self._wake_unless_capped()
        return now

    def _wake_unless_capped(self) -> None:
        """Wake the loop for a trigger, but not while it waits out the hourly ceiling (a
        flood would otherwise wake it, for nothing, once per leaf)."""
        if not self.budget.waiting:
            self._wake.set()

    async def add(self, topic: str, envelope: Envelope, leaf: bytes) -> None:
        """Store the message's leaf; durable on return (await it before a QoS 1 PUBACK).
        Raises LeafBudgetError, storing nothing, if its seller is at its bound."""
        now = self._reserve(topic)
        try:
            await self.store.add(LeafRow.of(topic, envelope, leaf, now))
        except BaseException:
            self.budget.unreserve(topic)
            raise

    def add_nowait(self, topic: str, envelope: Envelope, leaf: bytes) -> None:
        """Queue the leaf for the next group commit, not awaited (QoS 0). Raises
        LeafBudgetError, queueing nothing, if its seller is at its bound."""
        now = self._reserve(topic)
        try:
            self.store.add_nowait(LeafRow.of(topic, envelope, leaf, now))
        except BaseException:
            self.budget.unreserve(topic)
            raise

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
                        self._paced = True
                        try:
                            await self._load()
                            delay = await self._step()
                        finally:
                            self._paced = False
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
                if count == 0 or self.budget.ceiling_wait(self.clock()) > 0:
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
        self.budget.reload(await self.store.pending_by_topic())
        self.budget.load_roots(await self.store.seal_times(self.config.max_roots_per_hour))
        self._loaded = True

    async def _step(self) -> float:
        """One round: finish the open batch, else seal one when due. Returns the delay."""
        batch = await self.store.open_batch()
        if batch is not None:
            await self._anchor(batch)
            self._errors = 0
            return 0.0
        now = self.clock()
        due_in = self.budget.due_in(now, self._pending, self._oldest)
        if due_in > 0 or not self._pending:
            return due_in if due_in > 0 else self.config.batch_seconds
        wait = self.budget.root_wait(now)
        if wait > 0:
            return wait
        if await self._seal() is None:
            return self.config.batch_seconds
        return 0.0

    async def _seal(self) -> Batch | None:
        """Seal the next root: sold leaves first, the room left to the oldest others. The
        leaves queued before it are committed first (a QoS 0 leaf may still linger in the group
        commit): a sold one left out would lose its sold mark with the others' at the seal."""
        await self.store.drain()
        chain_latest = await self.marketplace.anchors.latest_batch_id(self.operator)
        await self._pause()
        budget, now = self.budget, self.clock()
        sold = {} if budget.everything_sold else budget.sold()
        batch, more_sold = await self.store.seal_sold_first(
            self.config.max_leaves_per_root, chain_latest, now, sold
        )
        if batch is not None:
            budget.sealed(now, more_sold)
            self._fresh = batch.batch_id
        await self._pause()
        budget.reload(await self.store.pending_by_topic())
        if batch is not None:
            budget.remark(now)  # deliveries during the seal: their leaves stay sold
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
        delay = backoff_delay(self._errors, base=cfg.backoff_base, cap=cfg.backoff_max)
        self._retry_at = self.clock() + delay
        self.log.warning(
            "anchors: anchoring failed (%d in a row), retrying in %.2fs: %s",
            self._errors,
            delay,
            exc,
        )
        return delay

    async def _pause(self) -> None:
        """Between two chain calls of a background step: let deliveries run first
        (:attr:`AnchorConfig.pause_seconds`)."""
        if self._paced and self.config.pause_seconds > 0:
            await asyncio.sleep(self.config.pause_seconds)

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
        fate cannot be decided now (it stays open).

        A batch this anchorer has just sealed (its id one past the chain's latest, read
        before the seal) skips the two look-ups: were its id taken meanwhile, the gas
        estimate reverts and the batch takes the full path then."""
        fresh = self._fresh == batch.batch_id and batch.tx_hash is None
        self._fresh = None  # a second attempt looks the batch up
        if not fresh:
            info = await self.marketplace.anchors.anchor_of(self.operator, batch.batch_id)
            await self._pause()
            if info is not None:
                return await self._settle(
                    batch, info.root, info.leaf_count, info.block_number, None
                )
            if batch.tx_hash is not None and await self._in_mempool(batch.tx_hash):
                raise _PendingError(
                    f"batch {batch.batch_id}: transaction {batch.tx_hash.hex()} pending"
                )
            latest = await self.marketplace.anchors.latest_batch_id(self.operator)
            await self._pause()
            if latest >= batch.batch_id:
                await self._fail(
                    batch, f"batch id {batch.batch_id} passed on chain (latest {latest})"
                )
                return None
        call = self.marketplace.anchors.contract.functions.anchor(
            batch.batch_id, batch.root, batch.leaf_count
        )
        batch_id = batch.batch_id

        async def record(tx_hash: bytes) -> None:
            await self.store.mark_sent(batch_id, tx_hash)
            await self._pause()

        try:
            tx_hash = await self.transactor.submit(call, before_send=record)
        except ContractRevertError as exc:
            if exc.error_name == "DataAnchorsBatchIdNotIncreasing":
                if fresh:  # the look-ups skipped above decide it now, on the stored batch
                    return await self._anchor(await self.store.batch(batch_id) or batch)
                # Raced by another anchor under our key: the chain decides next round.
                raise ChainError(f"batch {batch_id}: {exc}") from exc
            raise
        await self._pause()
        receipt = await self.transactor.wait(tx_hash, call)
        await self._pause()
        gas = int(receipt["gasUsed"])
        self.gas_used += gas
        self.log.info("anchors: batch %d sent as %s (gas %d)", batch_id, bytes(tx_hash).hex(), gas)
        # What anchorOf would say, from the receipt's event: no call to the node for it.
        anchored = self.marketplace.anchors.anchored_in(receipt, self.operator, batch_id)
        if anchored is None:
            raise ChainError(f"batch {batch_id}: mined without its Anchored event (reorg?)")
        root, leaf_count = anchored
        block = int(receipt["blockNumber"])
        return await self._settle(batch, root, leaf_count, block, bytes(tx_hash), gas)

    async def _settle(
        self,
        batch: Batch,
        root: bytes,
        leaf_count: int,
        block_number: int,
        tx_hash: bytes | None,
        gas: int | None = None,
    ) -> AnchorRecord | None:
        """The chain holds an anchor (``root``, ``leaf_count``, in ``block_number``) under the
        batch's id: ours if the root matches."""
        if root != batch.root or leaf_count != batch.leaf_count:
            await self._fail(
                batch,
                f"batch id {batch.batch_id} carries another root on chain ({root.hex()})",
            )
            return None
        shallow = await confirmations_missing(
            self.marketplace.w3,
            block_number,
            self.config.confirmations,
            "anchors: block number",
        )
        if shallow is not None:
            raise _PendingError(f"batch {batch.batch_id}: {shallow}")
        if self.config.confirmations:
            await self._pause()
        if tx_hash is None:
            tx_hash = batch.tx_hash if batch.state == "sent" else None
            found = await self._find_tx(batch.batch_id, block_number)
            tx_hash = found or tx_hash
        await self.store.mark_confirmed(batch.batch_id, tx_hash, block_number, gas)
        self.batches_anchored += 1
        self.last_batch_id = max(self.last_batch_id, batch.batch_id)
        record = AnchorRecord(batch.batch_id, batch.root, batch.leaf_count, tx_hash, block_number)
        self.log.info(
            "anchors: batch %d anchored (%d leaves, block %d)",
            batch.batch_id,
            batch.leaf_count,
            block_number,
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
        self.budget.reload(await self.store.pending_by_topic())
        count, oldest = await self.store.pending()
        self._pending = count
        self._oldest = None if count == 0 else oldest

    async def _in_mempool(self, tx_hash: bytes) -> bool:
        """Whether the node still knows an unmined ``tx_hash`` (then wait, do not resend)."""
        # A mined one (reverted, since anchorOf is empty) or a forgotten one is sent again.
        _, pending = await find_transaction(
            self.marketplace.w3, tx_hash, "anchors: transaction lookup"
        )
        return pending

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
