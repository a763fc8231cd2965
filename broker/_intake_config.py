"""The ``payments.intake`` config section: how vouchers are taken in and receipts sent back.

Apart from :mod:`blendsm.broker._config` (which only holds the field and one parse line) so the
voucher intake's knobs and their bounds live next to each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from blendsm.broker._config_fields import check_keys, integer, seconds
from blendsm.errors import ConfigError

__all__ = ["IntakeConfig", "parse_intake"]

_WHERE: Final = "payments.intake"


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    """Voucher intake: receipt batching and the per-session bound on queued vouchers."""

    linger_seconds: float = 0.0005
    """How long the intake waits, after a voucher arrives at an idle intake, before it takes
    the batch (0 to 1 s): vouchers that arrive together (a burst, several payers at once) then
    share one verification per channel and one commit. Vouchers that arrive while a commit is
    in flight wait for it anyway and take no linger. It adds to a voucher's round trip, which
    the credit must cover: keep it well below a few messages' time."""
    unawaited_linger_seconds: float = 0.01
    """How long a queued voucher that no delivery waits on may wait, since it arrived, before
    its batch is taken (0 to 1 s; 0 = never): the vouchers that arrive meanwhile share its
    commit, whose fsync costs more broker CPU than everything else a voucher does; at most a
    quarter of the time since the channel's previous voucher (``broker/_commit_linger.py``).
    A delivery refused for credit on a queued voucher's channel ends the wait at once, so no
    delivery waits for the linger itself; it delays the voucher's receipt and a settlement's
    view of it by at most this."""
    receipt_every: int = 10
    """A Receipt goes out after this many accepted vouchers of a channel on a session (1 to
    10000; 1 = a receipt per accepted voucher). A receipt is cumulative, so one covers every
    voucher before it."""
    receipt_delay_seconds: float = 0.1
    """...or this long after the previous receipt of that channel on that session, whichever
    comes first (0 to 60 s); the first voucher after a quiet spell is answered at once."""
    max_pending_per_session: int = 64
    """Vouchers one session may have waiting for verification and commit (1 to 100000); past
    it a newer voucher of a channel replaces the session's latest queued one of that channel
    (it covers it), and any other voucher is dropped and counted."""


def parse_intake(data: Mapping[str, Any]) -> IntakeConfig:
    """Read ``payments.intake`` (every field optional, bounded)."""
    check_keys(data, IntakeConfig, _WHERE)
    default = IntakeConfig()
    linger = seconds(data, "linger_seconds", _WHERE, default.linger_seconds, allow_zero=True)
    if linger > 1:
        raise ConfigError(f"{_WHERE}.linger_seconds: must be <= 1, got {linger}")
    unawaited = seconds(
        data,
        "unawaited_linger_seconds",
        _WHERE,
        default.unawaited_linger_seconds,
        allow_zero=True,
    )
    if unawaited > 1:
        raise ConfigError(f"{_WHERE}.unawaited_linger_seconds: must be <= 1, got {unawaited}")
    delay = seconds(
        data, "receipt_delay_seconds", _WHERE, default.receipt_delay_seconds, allow_zero=True
    )
    if delay > 60:
        raise ConfigError(f"{_WHERE}.receipt_delay_seconds: must be <= 60, got {delay}")
    return IntakeConfig(
        linger_seconds=linger,
        unawaited_linger_seconds=unawaited,
        receipt_every=integer(
            data, "receipt_every", _WHERE, default.receipt_every, low=1, high=10_000
        ),
        receipt_delay_seconds=delay,
        max_pending_per_session=integer(
            data,
            "max_pending_per_session",
            _WHERE,
            default.max_pending_per_session,
            low=1,
            high=100_000,
        ),
    )
