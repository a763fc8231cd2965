"""A service's ``run()`` loop in a background task for the length of a ``with`` block, and a
record of the Tasks started meanwhile (to show a path starts none per delivery)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

__all__ = ["running", "tasks_started"]


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


@contextlib.contextmanager
def tasks_started() -> Iterator[list[str]]:
    """``with tasks_started() as started:`` records the ``__qualname__`` of every coroutine
    the running loop starts as a Task within the block (its task factory, restored after).
    A count, not a mock: the Tasks are created and run as usual."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    started: list[str] = []

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **options: Any
    ) -> asyncio.Task[Any]:
        started.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **options)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield started
    finally:
        loop.set_task_factory(previous)
