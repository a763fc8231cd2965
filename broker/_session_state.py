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
    module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages: SmallQueue[Any] = SmallQueue()
        self.delivered_message_queue: SmallQueue[Any] = SmallQueue()

    def _init_states(self) -> None:
        self.transitions = SessionState(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.retained_messages = SmallQueue()
        self.delivered_message_queue = SmallQueue()
