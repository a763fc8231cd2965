"""Capped exponential backoff: the one retry-delay formula every retry loop uses.

The chain view, settlement, the anchorer, the event follower and the SDK's reconnect loop all
retry after failures. They share this formula so a change to the policy (cap, jitter) is made
once, and so no loop can forget the exponent cap (``2 ** 1000`` is a float overflow).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Jitter", "backoff_delay"]

_MAX_EXPONENT = 30
"""2**30 times any sane base exceeds any sane cap: larger exponents only risk overflow."""


class Jitter:
    """How much of the capped delay is drawn at random.

    ``NONE``: the delay itself (one retrier, e.g. a broker's own background task).
    ``HALF``: half fixed, half uniform (many followers, still a floor between attempts).
    ``FULL``: uniform in [0, delay] (a fleet of clients after a broker restart: no lockstep).
    """

    NONE = 0.0
    HALF = 0.5
    FULL = 1.0


def backoff_delay(
    failures: int,
    *,
    base: float,
    cap: float,
    jitter: float = Jitter.NONE,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 = the first failure).

    ``min(cap, base * 2 ** (failures - 1))``, of which the fraction ``jitter`` (0..1) is drawn
    uniformly at random. ``failures <= 0`` returns 0: nothing failed, nothing to wait for.
    """
    if failures <= 0:
        return 0.0
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")
    ceiling = min(cap, base * 2.0 ** min(failures - 1, _MAX_EXPONENT))
    if jitter == 0.0:
        return float(ceiling)
    fixed = ceiling * (1.0 - jitter)
    return float(fixed + uniform(0.0, ceiling - fixed))
