"""Joining the permissioned registry: a participant applies for a role and the oracle (or
another approver) approves it. Two transports, one sequence of calls:

- ``enrol``: through our async ``Marketplace`` bindings (``mp(label)`` signs as that account);
- ``enrol_raw``: through plain synchronous web3, for contract tests that check the contracts
  independently of the bindings; the caller's ``transact(call, label)`` sends each call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blendsm.contracts import Marketplace, Role

__all__ = ["enrol", "enrol_raw"]

MakeMp = Callable[[str], Marketplace]


async def enrol(mp: MakeMp, chain: Any, label: str, role: Role, *, approver: str = "oracle") -> str:
    """``label`` applies for ``role`` and ``approver`` approves it; the participant's address."""
    await mp(label).registry.apply_for_role(role)
    await mp(approver).registry.approve(chain.addr(label))
    return str(chain.addr(label))


def enrol_raw(
    chain: Any,
    transact: Callable[[Any, str], Any],
    label: str,
    role: int,
    *,
    approver: str = "oracle",
) -> str:
    """``enrol`` through plain web3: ``transact(call, sender_label)`` sends each contract call
    (and checks its receipt); the participant's address."""
    registry = chain.Registry.functions
    transact(registry.applyForRole(role), label)
    transact(registry.approve(chain.addr(label)), approver)
    return str(chain.addr(label))
