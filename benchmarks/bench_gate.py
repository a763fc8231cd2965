"""The delivery gate's CPU per delivery, in process: ``MarketplaceService.admit`` per session
against ``MarketplaceService.gate`` made once per broadcast, on a real broker and chain view.

Run as ``python benchmarks/bench_gate.py [broadcasts] [repeats]`` (defaults 20000 and 7; about
20 s). Why in process: the paid benchmark's end-to-end figures move by 2x with whatever else
runs on a shared 2-core machine; the gate is synchronous, so ``time.process_time`` over many
calls, repeated and median-ed, measures it to a fraction of a microsecond.

Set-up is configuration (c) of ``bench_paid_delivery.py``: the embedded chain with the suite
deployed, ``bench/t`` priced 1000 wei, 10 buyers with a channel each naming the operator, and
the BlendSM broker started on it. Each of the 10 sessions is an amqtt ``Session`` carrying the
buyer's :class:`~blendsm.broker.Identity`, as the broker attaches at CONNECT. Each delivery is
gated (a reservation on the buyer's channel) and the reservation released, so credit never
runs out. A public topic (``bench/public``) is measured the same way. Printed: microseconds per
delivery, median (min-max) over the repeats, and the ratio.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import bench_paid_delivery as paid  # the same market set-up as configuration c
from broker_process import quiet

N_SESSIONS = 10


CHUNK = 500
"""Broadcasts timed between two yields to the loop: the chain view must keep following the
chain, or it turns unhealthy and the gate (rightly) refuses everything."""


async def _per_delivery(run: Any, broadcasts: int) -> float:
    spent = 0.0
    for _ in range(0, broadcasts, CHUNK):
        start = time.process_time()
        run(CHUNK)
        spent += time.process_time() - start
        await asyncio.sleep(0.002)
    return spent / (-(-broadcasts // CHUNK) * CHUNK * N_SESSIONS) * 1e6


async def main(broadcasts: int, repeats: int) -> None:
    from amqtt.session import Session

    from blendsm.broker import ChainConnection, Identity, Verdict, start_broker
    from blendsm.contracts import EMBEDDED, connect, new_embedded_chain

    quiet()
    deployer, operator, seller, device, buyers = paid._market_accounts(N_SESSIONS)
    tester = new_embedded_chain(
        fund=[a.address for a in (deployer, operator, seller, device, *buyers)], amount=10**21
    )
    w3 = connect(EMBEDDED, ethereum_tester=tester)
    deployment = await paid._build_market(w3, N_SESSIONS)
    with tempfile.TemporaryDirectory() as data_dir:
        running = await start_broker(
            paid._blendsm_config(data_dir),
            chain=ChainConnection(w3, deployment, operator, tester, owned=False),
        )
        try:
            service = running.service
            meter = service.meter
            sessions = []
            for buyer in buyers:
                session = Session()
                session.client_id = buyer.address
                session.blendsm = Identity("participant", buyer.address, buyer.address.lower())
                sessions.append(session)

            view = service.view
            key = buyers[-1].address.lower()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the view follows the channel events
                topic_info = view.topic_for_name(paid.TOPIC)
                if topic_info is not None and meter.select(key, topic_info, view) is not None:
                    break
                meter.forget_choices()
                await asyncio.sleep(0.1)

            def settle(verdict: Any) -> None:
                if verdict is Verdict.FREE:
                    return
                if verdict.__class__ is Verdict:
                    raise SystemExit(f"gate refused a delivery: {verdict}")
                meter.release(verdict)

            def per_session(topic: str) -> Any:
                admit = service.admit

                def run(n: int) -> None:
                    for _ in range(n):
                        for session in sessions:
                            settle(admit(session, topic))

                return run

            def per_broadcast(topic: str) -> Any:
                def run(n: int) -> None:
                    for _ in range(n):
                        gate = service.gate(topic)
                        for session in sessions:
                            settle(gate(session))

                return run

            print(
                f"delivery gate, {N_SESSIONS} sessions per broadcast, {broadcasts} broadcasts,"
                f" {repeats} repeats: us per delivery, median (min-max)"
            )
            for label, topic in (("paid", paid.TOPIC), ("public", "bench/public")):
                figures: dict[str, list[float]] = {"admit": [], "gate": []}
                for _ in range(repeats):  # interleaved, so load on the machine hits both
                    figures["admit"].append(await _per_delivery(per_session(topic), broadcasts))
                    figures["gate"].append(await _per_delivery(per_broadcast(topic), broadcasts))
                med = {k: statistics.median(v) for k, v in figures.items()}
                for name, values in figures.items():
                    print(
                        f"  {label:6} {name:5}  {med[name]:5.2f} us"
                        f"  ({min(values):.2f}-{max(values):.2f})"
                    )
                print(f"  {label:6} gate/admit {med['gate'] / med['admit']:.2f}")
        finally:
            await running.stop()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*(args + [20000, 7][len(args) :])))
