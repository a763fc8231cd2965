"""A service's ``run()`` loop in a background task for the length of a ``with`` block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

__all__ = ["running"]


class Runnable(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


R = TypeVar("R", bound=Runnable)


@contextlib.asynccontextmanager
async def running(service: R, within: float = 5.0) -> AsyncIterator[R]:
    """``async with running(anchorer) as a:`` runs ``service.run()`` in a task; on exit it
    calls ``service.stop()`` and waits up to ``within`` seconds for the loop to end."""
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, within)
