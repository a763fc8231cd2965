"""What one proof of an anchored message costs the broker.

Run as ``python benchmarks/bench_proofs.py`` (about 40 s). A broker on the embedded chain
anchors three roots, of 100,000, 262,144 and 10,000 leaves, in that order (its anchorer's own
``anchor_now``); the tree cache holds 262,144 leaves, so only the newest tree stays cached.
Then it times ``Anchorer.proof_by_leaf``, what an MQTT or HTTP proof request awaits, for 15
random leaves of each root: first the newest root's (its tree cached by the seal), then the two
older roots' in turn, so that a broker which caches a tree it rebuilt for a proof evicts the
other one each time (what a client asking for old proofs would make it do).

A leaf's cost is what it keeps the leaf store's thread, where every leaf add (so every QoS 1
PUBACK) waits behind it. Run it on an older tree to compare (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from typing import Any

import bench_paid_delivery as paid
from broker_process import pin, quiet

ROOTS = (100_000, 262_144, 10_000)
PROOFS = 15


def _config(data_dir: str) -> Any:
    from blendsm.broker import parse_config

    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 2.0},
            "data_dir": data_dir,
            "anchoring": {
                "batch_seconds": 3600,
                "batch_max_leaves": 1_000_000,
                "max_leaves_per_root": max(ROOTS),
                "max_pending_leaves_per_seller": sum(ROOTS),
                "max_roots_per_hour": 3600,
            },
            "log_level": "WARNING",
        }
    )


async def main() -> None:
    from blendsm.broker import ChainConnection, start_broker
    from blendsm.contracts import EMBEDDED, connect, new_embedded_chain
    from blendsm.device_sdk import EnvelopeSigner, MessageDomain

    quiet()
    deployer, operator, seller, device, buyers = paid._market_accounts(1)
    tester = new_embedded_chain(
        fund=[a.address for a in (deployer, operator, seller, device, *buyers)], amount=10**21
    )
    w3 = connect(EMBEDDED, ethereum_tester=tester)
    deployment = await paid._build_market(w3, 1)
    domain = MessageDomain(deployment.chain_id, deployment.address("Registry"))
    # One signed envelope under many leaves: the proofs are looked up by leaf, and signing
    # 372,144 envelopes would only lengthen the set-up.
    envelope = EnvelopeSigner(device.key, domain).sign(paid.TOPIC, b"x" * 64, 1, 1_000)
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as data_dir:
        running = await start_broker(
            _config(data_dir), chain=ChainConnection(w3, deployment, operator, tester, owned=False)
        )
        try:
            anchorer = running.service.anchorer
            assert anchorer is not None
            picked: list[list[bytes]] = []
            first = 0
            for n in ROOTS:
                leaves = [i.to_bytes(32, "big") for i in range(first + 1, first + n + 1)]
                first += n
                for leaf in leaves:
                    anchorer.add_nowait(paid.TOPIC, envelope, leaf)
                records = await anchorer.anchor_now()
                assert [r.leaf_count for r in records] == [n], records
                picked.append(rnd.sample(leaves, PROOFS))
            spent: dict[int, list[float]] = {n: [] for n in ROOTS}

            async def prove(n: int, leaf: bytes) -> None:
                t = time.perf_counter()
                proof = await anchorer.proof_by_leaf(leaf)
                spent[n].append(time.perf_counter() - t)
                assert proof is not None
                assert proof.leaf_count == n

            newest = ROOTS[-1]
            for leaf in picked[-1]:  # the newest root, whose tree the seal left cached
                await prove(newest, leaf)
            for i in range(PROOFS):  # the two older ones in turn: neither stays cached
                for n, leaves in zip(ROOTS[:-1], picked[:-1], strict=True):
                    await prove(n, leaves[i])
            print(f"bench_proofs: one proof (Anchorer.proof_by_leaf), median (max) of {PROOFS}")
            for n in ROOTS:
                print(
                    f"  root of {n:>7} leaves, {'newest' if n == newest else 'older '}:"
                    f" {statistics.median(spent[n]) * 1e3:8.2f} ms ({max(spent[n]) * 1e3:.2f} ms)",
                    flush=True,
                )
        finally:
            await running.stop()


if __name__ == "__main__":
    pin("broker")
    asyncio.run(main())
