"""Connection set-up costs O(this client's own state), not O(every session or filter).

amqtt 0.12.1 looked at every subscription filter on each CONNECT (to send retained messages
that BlendBroker sends only on SUBSCRIBE anyway) and formatted the whole subscription table
after each SUBSCRIBE (``repr``, whatever the log level): 10,000 clients took minutes to
connect. These tests count, on a real broker with real sockets, how many entries of the
broker's session and subscription tables one more client's CONNECT, SUBSCRIBE and DISCONNECT
visit while many other clients are connected: the tables are dicts that count what is read
through them (instrumentation, the broker's own code runs unchanged).
"""

from __future__ import annotations

import asyncio
from typing import Any

from support import connect_packet, eventually, subscribe_packet

from .conftest import StartMarket

OTHERS = 150
"""Clients connected, each with a filter of its own, before the one whose costs are counted."""


class CountingDict(dict[Any, Any]):
    """A dict that counts the entries every full iteration or ``repr`` of it visits."""

    visited = 0

    def _visit(self) -> None:
        self.visited += len(self)

    def __iter__(self) -> Any:
        self._visit()
        return super().__iter__()

    def keys(self) -> Any:
        self._visit()
        return super().keys()

    def values(self) -> Any:
        self._visit()
        return super().values()

    def items(self) -> Any:
        self._visit()
        return super().items()

    def __repr__(self) -> str:
        self._visit()
        return super().__repr__()


async def _client(port: int, client_id: str, topic: str) -> asyncio.StreamWriter:
    """A raw MQTT 3.1.1 client: CONNECT, CONNACK, SUBSCRIBE, SUBACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(client_id, 0))
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
    writer.write(subscribe_packet(1, topic, 0))
    suback = await asyncio.wait_for(reader.readexactly(5), 10)
    assert suback[0] >> 4 == 9, suback  # SUBACK
    assert suback[4] == 0, suback  # granted QoS 0
    return writer


async def test_one_connect_visits_no_other_session_or_filter(start_market: StartMarket) -> None:
    market = await start_market()
    broker = market.running.broker
    sessions, subscriptions = CountingDict(), CountingDict()
    broker._sessions = sessions
    broker._subscriptions = subscriptions
    broker.subscription_table()  # the trie follows the counted table from now on
    others = [await _client(market.port, f"other-{n}", f"scale/{n}") for n in range(OTHERS)]
    assert len(subscriptions) == OTHERS
    assert len(sessions) == OTHERS

    sessions.visited = subscriptions.visited = 0
    writer = await _client(market.port, "counted", "scale/counted")
    writer.write(b"\xe0\x00")  # DISCONNECT
    await writer.drain()
    writer.close()
    await eventually(lambda: "counted" not in sessions, what="the clean session removed")
    assert "scale/counted" not in subscriptions
    # Entries visited by scans while one client came and went: none of the others'.
    filters_visited, sessions_visited = subscriptions.visited, sessions.visited
    assert filters_visited < OTHERS / 10, f"{filters_visited} filter entries visited"
    assert sessions_visited < OTHERS / 10, f"{sessions_visited} session entries visited"

    for other in others:
        other.close()
