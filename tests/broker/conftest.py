"""Helpers shared by the broker's white-box tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar


class BackgroundLoop(Protocol):
    """A broker background loop: :meth:`run` until :meth:`stop` (Settler, Anchorer)."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


_L = TypeVar("_L", bound=BackgroundLoop)


@contextlib.asynccontextmanager
async def running(loop: _L) -> AsyncIterator[_L]:
    """Run ``loop`` in a task for the block; stop it and wait (bounded) for it to end."""
    task = asyncio.create_task(loop.run())
    try:
        yield loop
    finally:
        loop.stop()
        await asyncio.wait_for(task, 5)
