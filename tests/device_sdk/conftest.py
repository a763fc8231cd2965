"""Fixtures shared by the device SDK tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import pytest
from support.stock_amqtt import STOCK_OPERATORS, StockBroker, free_port


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@pytest.fixture
def closing() -> Iterator[Callable[[C], C]]:
    """``closing(thing)`` returns ``thing`` and closes it when the test ends, last made
    first closed: the one try/yield/finally every client and broker fixture needs."""
    made: list[Closable] = []

    def register(thing: C) -> C:
        made.append(thing)
        return thing

    yield register
    for thing in reversed(made):
        thing.close()


@pytest.fixture
def brokers() -> Iterator[list[StockBroker]]:
    """Two stock amqtt brokers on free ports (one per :data:`STOCK_OPERATORS`), closed after."""
    running = [StockBroker(free_port()).start() for _ in STOCK_OPERATORS]
    try:
        yield running
    finally:
        for broker in running:
            broker.close()
