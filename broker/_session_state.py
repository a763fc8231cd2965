"""``BlendSession``: amqtt's Session with a three-state flag instead of a ``transitions.Machine``.

amqtt 0.12.1 gives every session its own ``transitions.Machine`` (states, events, transition
objects and callback lists built per instance): about 2 ms of CPU to create and 10-12 KB of
memory per session, for a state that is one of three strings. With 10,000 clients that was
20 s of CONNECT handling and over 100 MB. :class:`SessionState` keeps the part of the
Machine's interface amqtt and BlendSM use (``state``, ``connect()``, ``disconnect()``,
``is_connected()``...), with the same rules: ``connect`` from ``connected`` raises
``MachineError`` (amqtt's take-over path relies on it), ``disconnect`` is allowed from every
state, and entering a state runs the Session's own ``_on_enter_*`` bookkeeping
(``last_connect_time``, ``last_disconnect_time``). Its two queues are
:class:`~blendsm.broker._small_queue.SmallQueue`s (no deque while empty). Sessions made elsewhere (amqtt's
``create_offline_session``) keep the Machine and asyncio Queues; both kinds work side by side.
"""

from __future__ import annotations

from typing import Any, Final

from amqtt.session import Session
from transitions import MachineError

from blendsm.broker._small_queue import SmallQueue

__all__ = ["BlendSession", "SessionState"]

CONNECTED: Final = "connected"
DISCONNECTED: Final = "disconnected"
NEW: Final = "new"


class SessionState:
    """The session's connection state: ``new`` -> ``connected`` <-> ``disconnected``."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state: str = NEW

    def connect(self) -> bool:
        """Enter ``connected``; refused (``MachineError``) when already connected."""
        if self.state == CONNECTED:
            raise MachineError(f"Can't trigger event connect from state {CONNECTED}!")
        self.state = CONNECTED
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        """Enter ``disconnected`` (from any state, as amqtt's Machine allows)."""
        self.state = DISCONNECTED
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == NEW

    def is_connected(self) -> bool:
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        return self.state == DISCONNECTED


class BlendSession(Session):  # type: ignore[misc]  # amqtt ships no types: Session is Any
    """amqtt's Session with :class:`SessionState` and :class:`SmallQueue` queues (see the
    module docstring).

    BlendSM's own attributes live in slots: amqtt's Session sets 29 attributes, and CPython
    shares the keys of instance dicts only up to 30, so BlendSM's first extra attribute grew
    every session's dict from about 300 bytes to about 1,600."""

    __slots__ = (
        "blendsm",
        "blendsm_authenticated",
        "blendsm_hold",
        "blendsm_queued_bytes",
        "blendsm_replaying",
        "blendsm_window_paused",
        "transitions",
    )

    def __init__(self) -> None:
        super().__init__()
        self._small_queues()

    def _small_queues(self) -> None:
        # In the instance dict, as amqtt's (mypy cannot see the dict a Session base gives).
        self.retained_messages: SmallQueue[Any] = SmallQueue()  # type: ignore[misc]
        self.delivered_message_queue: SmallQueue[Any] = SmallQueue()  # type: ignore[misc]

    def _init_states(self) -> None:
        self.transitions = SessionState(self)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        for name in self.__slots__:
            if hasattr(self, name):
                state[name] = getattr(self, name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        slots = {name: state.pop(name) for name in self.__slots__ if name in state}
        super().__setstate__(state)
        for name, value in slots.items():
            setattr(self, name, value)
        self._small_queues()
