"""Fixtures of the async chain-layer tests: an AsyncWeb3 on the test chain and
Marketplace bindings signing as any test account."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from blendsm.contracts import Marketplace, disconnect

MakeMp = Callable[[str], Marketplace]


@pytest.fixture
async def w3(chain: Any) -> AsyncIterator[Any]:
    w3 = chain.async_w3()
    yield w3
    await disconnect(w3)


@pytest.fixture
def mp(chain: Any, w3: Any) -> MakeMp:
    """A Marketplace signing as the account with this label (one Transactor per label)."""
    made: dict[str, Marketplace] = {}

    def make(label: str) -> Marketplace:
        if label not in made:
            made[label] = Marketplace(w3, chain.deployment, chain.accounts[label])
        return made[label]

    return make
