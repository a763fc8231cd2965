"""EventFollower: order, exactly-once, confirmation depth, persisted cursor, node restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from blendsm.contracts import (
    AnvilNode,
    ChainEvent,
    Cursor,
    EventFollower,
    FileCursorStore,
    Market,
    Marketplace,
    MemoryCursorStore,
    Role,
    connect,
    deploy_suite,
    disconnect,
    test_account,
)
from blendsm.errors import ConfigError

ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)
FAST = {"poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4}

MakeMp = Callable[[str], Marketplace]


async def produce(mp: MakeMp, chain: Any) -> list[str]:
    """A little market history; returns the event names it emits, in order."""
    for label, role in (("seller", Role.SELLER), ("buyer", Role.BUYER)):
        await mp(label).registry.apply_for_role(role)
        await mp("oracle").registry.approve(chain.addr(label))
    created = await mp("seller").market.create_topic("plant/4/flow", 7)
    # three logs in one transaction, so one block
    await mp("seller").market.set_access(
        created.topic_id, [chain.addr(x) for x in ("buyer", "buyer2", "stranger")]
    )
    await mp("buyer").channels.open(chain.addr("seller"), None, None, 10**15)
    return [
        "Applied",
        "Approved",
        "Applied",
        "Approved",
        "TopicCreated",
        "AccessListUpdated",
        "AccessListUpdated",
        "AccessListUpdated",
        "ChannelOpened",
    ]


async def head(w3: Any) -> int:
    return int(await w3.eth.block_number)


async def drain(follower: EventFollower) -> list[ChainEvent]:
    """Poll until a poll delivers nothing."""
    out: list[ChainEvent] = []
    while batch := await follower.poll():
        out += batch
    return out


def check_order(events: list[ChainEvent]) -> None:
    positions = [e.position for e in events]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


async def test_delivered_in_order_exactly_once(chain: Any, w3: Any, mp: MakeMp) -> None:
    start = await head(w3) + 1
    expected = await produce(mp, chain)
    follower = EventFollower(w3, chain.deployment, confirmations=0, start_block=start, max_range=2)
    got = await drain(follower)
    assert [e.event for e in got] == expected
    check_order(got)
    assert follower.cursor == await head(w3)
    assert follower.position == Cursor(follower.cursor)
    access = [e for e in got if e.event == "AccessListUpdated"]
    assert len({e.block_number for e in access}) == 1
    assert [e.log_index for e in access] == [0, 1, 2]

    first = got[0]
    assert (first.contract, first.address) == ("Registry", chain.deployment.address("Registry"))
    assert first.args == {"account": chain.addr("seller"), "role": Role.SELLER}
    assert isinstance(first.args["role"], Role)
    assert len(first.tx_hash) == 32
    assert len(first.block_hash) == 32
    topic = next(e for e in got if e.event == "TopicCreated")
    assert topic.args["topicId"] == Market.topic_id("plant/4/flow")
    assert topic.args["name"] == "plant/4/flow"

    assert await follower.poll() == []  # nothing twice
    await mp("seller").registry.add_device(chain.addr("device"))
    assert [e.event for e in await follower.poll()] == ["DeviceAdded"]
    assert await follower.poll() == []


async def test_select_a_subset(chain: Any, w3: Any, mp: MakeMp) -> None:
    start = await head(w3) + 1
    await produce(mp, chain)
    follower = EventFollower(
        w3,
        chain.deployment,
        confirmations=0,
        start_block=start,
        select=["Market", "PaymentChannels.ChannelOpened", "Approved"],
    )
    names = [e.event for e in await drain(follower)]
    assert names == [
        "Approved",
        "Approved",
        "TopicCreated",
        *["AccessListUpdated"] * 3,
        "ChannelOpened",
    ]
    for bad in (["Market.Nope"], ["Nope"], ["Nobody.Applied"], []):
        with pytest.raises(ConfigError):
            EventFollower(w3, chain.deployment, select=bad)
    with pytest.raises(ConfigError, match="confirmations"):
        EventFollower(w3, chain.deployment, confirmations=-1)


async def test_cursor_persisted_and_resumed_mid_block(
    chain: Any, w3: Any, mp: MakeMp, tmp_path: Path
) -> None:
    start = await head(w3) + 1
    expected = await produce(mp, chain)
    store = FileCursorStore(tmp_path / "cursor.json")
    seen: list[ChainEvent] = []

    first = EventFollower(
        w3, chain.deployment, confirmations=0, start_block=start, store=store, **FAST
    )
    async with contextlib.aclosing(first.events()) as stream:
        async for event in stream:
            seen.append(event)
            if event.event == "AccessListUpdated" and event.log_index == 1:
                break  # stop in the middle of a block
    saved = Cursor.from_json((tmp_path / "cursor.json").read_text())
    assert saved == first.position == Cursor(seen[-1].block_number - 1, 1)

    # a new follower (a restarted broker) resumes from the file, ignoring start_block
    second = EventFollower(
        w3, chain.deployment, confirmations=0, start_block=0, store=store, **FAST
    )
    rest = await drain(second)
    assert [e.event for e in seen + rest] == expected
    check_order(seen + rest)
    assert (rest[0].event, rest[0].log_index) == ("AccessListUpdated", 2)

    third = EventFollower(w3, chain.deployment, confirmations=0, store=store, **FAST)
    assert await drain(third) == []
    assert third.cursor == await head(w3)


async def test_run_handler_failure_redelivers(chain: Any, w3: Any, mp: MakeMp) -> None:
    start = await head(w3) + 1
    expected = await produce(mp, chain)
    store = MemoryCursorStore()
    follower = EventFollower(
        w3, chain.deployment, confirmations=0, start_block=start, store=store, **FAST
    )
    handled: list[ChainEvent] = []

    async def flaky(event: ChainEvent) -> None:
        if event.event == "TopicCreated" and not any(e.event == "TopicCreated" for e in handled):
            handled.append(event)
            raise RuntimeError("handler bug")
        handled.append(event)

    with pytest.raises(RuntimeError, match="handler bug"):
        await follower.run(flaky)
    assert [e.event for e in handled] == expected[:5]

    # the failed event comes again, then the rest; a plain function works as a handler too
    def record(event: ChainEvent) -> None:
        handled.append(event)
        if len(handled) == len(expected) + 1:
            follower.stop()

    await asyncio.wait_for(follower.run(record), 10)
    names = [e.event for e in handled]
    assert names[:5] == expected[:5]
    assert names[5:] == expected[4:]
    assert store.cursor == follower.position


async def test_stop_before_start_and_between_events(chain: Any, w3: Any, mp: MakeMp) -> None:
    start = await head(w3) + 1
    expected = await produce(mp, chain)
    follower = EventFollower(w3, chain.deployment, confirmations=0, start_block=start, **FAST)
    follower.stop()  # asked before run() starts: run() ends at once
    await asyncio.wait_for(follower.run(lambda e: None), 5)
    assert follower.cursor == start - 1

    got: list[ChainEvent] = []

    def handler(event: ChainEvent) -> None:
        got.append(event)
        if len(got) == 2:
            follower.stop()  # mid-batch: no further event is handled

    await asyncio.wait_for(follower.run(handler), 5)
    assert [e.event for e in got] == expected[:2]
    assert follower.position == Cursor(got[1].block_number - 1, got[1].log_index)
    async with contextlib.aclosing(follower.events()) as stream:
        rest = [event async for event in _take(stream, len(expected) - 2)]
    assert [e.event for e in got + rest] == expected


async def _take(stream: AsyncIterator[ChainEvent], n: int) -> AsyncIterator[ChainEvent]:
    for _ in range(n):
        yield await asyncio.wait_for(anext(stream), 5)


async def test_invalid_cursor_file_is_config_error(chain: Any, w3: Any, tmp_path: Path) -> None:
    path = tmp_path / "cursor.json"
    path.write_text('{"block": "ten"}')
    follower = EventFollower(w3, chain.deployment, store=FileCursorStore(path))
    with pytest.raises(ConfigError, match=r"cursor\.json.*invalid event cursor"):
        await follower.poll()
    assert Cursor.from_json(Cursor(7, 3).to_json()) == Cursor(7, 3)


def test_backoff_is_capped_with_jitter(embedded_chain: Any) -> None:
    w3 = embedded_chain.async_w3()
    follower = EventFollower(w3, embedded_chain.deployment, backoff_initial=0.5, backoff_max=8.0)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (4, 4.0), (5, 8.0), (50, 8.0)):
        delays = {follower._backoff(failures) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


@ANVIL
async def test_confirmation_depth_on_anvil(chain: Any, w3: Any, mp: MakeMp) -> None:
    start = await head(w3) + 1
    follower = EventFollower(w3, chain.deployment, confirmations=3, start_block=start)
    await mp("seller").registry.apply_for_role(Role.SELLER)
    mined_in = await head(w3)
    for _ in range(2):
        assert await follower.poll() == []
        chain.w3.provider.make_request("evm_mine", [])
    assert await follower.poll() == []  # 2 blocks on top: not deep enough
    assert follower.cursor == mined_in - 1
    chain.w3.provider.make_request("evm_mine", [])
    got = await follower.poll()
    assert [(e.event, e.block_number) for e in got] == [("Applied", mined_in)]
    assert follower.cursor == mined_in
    assert await follower.poll() == []


async def test_follower_survives_anvil_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="blendsm.contracts.events")
    oracle, seller, buyer = (test_account(x) for x in ("oracle", "seller", "buyer"))
    node = AnvilNode(state_file=tmp_path / "anvil-state.json").start()
    w3 = connect(node.url)
    follow_w3 = connect(node.url, request_timeout=2)
    task: asyncio.Task[None] | None = None
    try:
        for account in (oracle, seller, buyer):
            await w3.provider.make_request("anvil_setBalance", [account.address, hex(10**21)])
        dep = await deploy_suite(w3, oracle, challenge_period=60)
        as_oracle, as_seller, as_buyer = (Marketplace(w3, dep, a) for a in (oracle, seller, buyer))
        store = FileCursorStore(tmp_path / "cursor.json")
        follower = EventFollower(follow_w3, dep, confirmations=0, store=store, **FAST)
        delivered: list[ChainEvent] = []
        task = asyncio.create_task(follower.run(delivered.append))

        async def until(condition: Callable[[], bool], limit: float = 20) -> None:
            deadline = asyncio.get_running_loop().time() + limit
            while not condition():
                assert not task.done(), task
                assert asyncio.get_running_loop().time() < deadline, "timed out"
                await asyncio.sleep(0.05)

        await as_seller.registry.apply_for_role(Role.SELLER)
        await as_oracle.registry.approve(seller.address)
        await until(lambda: len(delivered) == 2)

        node.stop()  # the follower keeps polling a dead node: it logs and backs off
        await until(lambda: follower.failures >= 2)
        assert any("chain poll failed" in r.getMessage() for r in caplog.records)

        node.start()  # same port, state reloaded
        await as_buyer.registry.apply_for_role(Role.BUYER)
        await as_oracle.registry.approve(buyer.address)
        topic = await as_seller.market.create_topic("after/restart", 1)
        await until(lambda: len(delivered) == 5)
        await asyncio.sleep(0.3)  # and nothing more turns up
        assert [e.event for e in delivered] == [
            "Applied",
            "Approved",
            "Applied",
            "Approved",
            "TopicCreated",
        ]
        assert delivered[-1].args["topicId"] == topic.topic_id
        check_order(delivered)
        assert follower.failures == 0
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert (await store.load()) == follower.position
        follower.stop()
        await asyncio.wait_for(task, 5)
    finally:
        if task is not None and not task.done():
            task.cancel()
        await disconnect(w3)
        await disconnect(follow_w3)
        node.stop()
