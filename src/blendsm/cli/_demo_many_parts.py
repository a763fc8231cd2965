"""What the stages of ``blendsm demo --brokers N`` share: the scenario's figures, the run's
parties and state, what each buyer's FailoverSubscriber reported, and the kill's timeline."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blendsm.cli._demo_brokers import BrokerProcess
from blendsm.cli._demo_parts import Progress

__all__ = [
    "BUYERS",
    "CREDIT",
    "DEPOSIT",
    "DEVICES",
    "FAILOVER_BOUND",
    "LABELS",
    "MAX_BROKERS",
    "OPERATORS",
    "PAY_EVERY",
    "RATE_HZ",
    "SETTLE_SECONDS",
    "TOPICS",
    "ManyRun",
    "Tape",
    "Timeline",
    "lost",
]

MAX_BROKERS = 4
"""More broker processes than this on a laptop measure the scheduler, not the product."""
OPERATORS = ("operator", "operator-b")
"""Operator ``A`` (enrolled by the development node) and operator ``B``."""
TOPICS = {"demo/temperature": 1_000, "demo/humidity": 700}
"""Price per message (wei); one device per topic."""
DEVICES = ("device-1", "device-2")
BUYERS = ("buyer-1", "buyer-2", "buyer-3", "buyer-4")
DEPOSIT = 10**17
"""Per channel: each buyer funds one channel with each operator."""
RATE_HZ = 10.0
CREDIT = 50
PAY_EVERY = 5
FAILOVER_BOUND = 5.0
SETTLE_SECONDS = 1.0
"""Each broker claims what it holds this often (what the end of the demo waits for)."""
LABELS = ("oracle", *OPERATORS, "seller", *BUYERS)
"""The accounts the chain funds (devices never send a transaction)."""


@dataclass
class Tape:
    """What one buyer's FailoverSubscriber reported (its callbacks run on paho threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    by_broker: dict[str, int] = field(default_factory=dict)
    failovers: list[tuple[float, Any]] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)
    unverified: int = 0


@dataclass
class ManyRun:
    """The demo's parties and state (closed in :func:`_close`)."""

    tmp: Path
    view: Progress
    node: Any = None
    """The demo's own development node (None on an external chain)."""
    url: str = ""
    """The chain's JSON-RPC URL (what the brokers and the SDK use)."""
    w3: Any = None
    deployment: Any = None
    mps: dict[str, Any] = field(default_factory=dict)
    topic_ids: dict[str, bytes] = field(default_factory=dict)
    brokers: list[BrokerProcess] = field(default_factory=list)
    channels: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(buyer, operator label) -> channel id."""
    subs: dict[str, Any] = field(default_factory=dict)
    tapes: dict[str, Tape] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    published: dict[str, list[int]] = field(default_factory=dict)
    by_port: dict[int, str] = field(default_factory=dict)
    owed_after_settle_up: int = 0
    """Brokers still holding a buyer's unconfirmed voucher after ``settle_up``."""
    accounts: dict[str, Any] = field(default_factory=dict)
    """Every party's TEST-ONLY account by label."""


@dataclass
class Timeline:
    killed: str
    moved: dict[str, float]
    """Buyers that were on the killed broker -> seconds from the SIGKILL to resumed."""
    rejoined_seconds: float | None
    """From the restart command to the devices' outboxes to it being empty again."""


def lost(run: ManyRun, buyer: str) -> int:
    """Sequences published that ``buyer`` has not received (after de-duplication)."""
    tape = run.tapes[buyer]
    with tape.lock:
        seen = set(tape.seen)
    lost = 0
    for device, topic in zip(DEVICES, TOPICS, strict=True):
        address = run.accounts[device].address.lower()
        lost += sum((address, topic, s) not in seen for s in run.published[device])
    return lost
