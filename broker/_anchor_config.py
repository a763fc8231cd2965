"""The anchorer's settings: when leaves are batched into a root, how roots are paced.

Apart from :mod:`blendsm.broker._anchors` (the :class:`~blendsm.broker._anchors.Anchorer`
loop) so the knobs and their bounds live next to each other, as the voucher intake's do in
:mod:`blendsm.broker._intake_config`; the broker config's ``anchoring`` section declares the
batching defaults once (:class:`~blendsm.broker._config.AnchoringConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from blendsm.broker._config import AnchoringConfig
from blendsm.errors import ConfigError

__all__ = ["AnchorConfig"]

_DEFAULTS: Final = AnchoringConfig()
"""The batching defaults are declared once, by the broker config."""


@dataclass(frozen=True, slots=True)
class AnchorConfig:
    """When leaves are anchored: every ``batch_seconds`` (counted from the oldest pending
    sold leaf) or as soon as ``batch_max_leaves`` sold leaves are pending, whichever comes
    first; unsold leaves alone after ``unsold_batch_seconds``; background roots at least
    ``3600 / max_roots_per_hour`` s apart, each up to ``max_leaves_per_root`` leaves, and
    never more than ``max_roots_per_hour`` roots (:mod:`blendsm.broker._anchor_budget`)."""

    batch_seconds: float = _DEFAULTS.batch_seconds
    batch_max_leaves: int = _DEFAULTS.batch_max_leaves
    max_leaves_per_root: int = _DEFAULTS.max_leaves_per_root
    max_roots_per_hour: int = _DEFAULTS.max_roots_per_hour
    unsold_batch_seconds: float = _DEFAULTS.unsold_batch_seconds
    max_pending_leaves_per_seller: int = _DEFAULTS.max_pending_leaves_per_seller
    confirmations: int = 0
    """Blocks on top of the anchor's block before it counts (and its proofs are handed out)."""
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    root_spacing_seconds: float | None = None
    """Background roots at least this far apart; None (the broker's setting): ``3600 /
    max_roots_per_hour``, so the hour's budget lasts the hour. Tests not about the pacing
    set 0."""
    pause_seconds: float = 0.005
    """Pause between two chain calls of a background anchor (none in :meth:`Anchorer.anchor_now`
    or :meth:`Anchorer.reconcile`). Why: a root's chain calls cost the event loop 13-16 ms of
    CPU, and back to back they took it within about 50 ms, on top of the deliveries (at 1,000
    paid messages/s each root made a 60-120 ms window of 2-7 ms latencies). Five pauses spread
    it over about twice that; a root lands 25 ms later. Measured: added p99 +0.97 to +1.22 ms
    with 5 ms, +1.31 to +2.02 ms without, +1.37 to +1.39 ms with 20 ms (docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if not self.batch_seconds > 0:
            raise ConfigError("anchors.batch_seconds: must be > 0")
        if not 1 <= self.batch_max_leaves <= 2**20:
            raise ConfigError("anchors.batch_max_leaves: must be in [1, 2**20]")
        if not 1 <= self.max_leaves_per_root <= 2**20:
            raise ConfigError("anchors.max_leaves_per_root: must be in [1, 2**20]")
        if not 1 <= self.max_roots_per_hour <= 3600:
            raise ConfigError("anchors.max_roots_per_hour: must be in [1, 3600]")
        if not self.unsold_batch_seconds >= 0:
            raise ConfigError("anchors.unsold_batch_seconds: must be >= 0")
        if self.max_pending_leaves_per_seller < 1:
            raise ConfigError("anchors.max_pending_leaves_per_seller: must be >= 1")
        if self.confirmations < 0:
            raise ConfigError("anchors.confirmations: must be >= 0")
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ConfigError("anchors: need 0 < backoff_base <= backoff_max")
        if self.root_spacing_seconds is not None and not 0 <= self.root_spacing_seconds <= 3600:
            raise ConfigError("anchors: root_spacing_seconds must be in [0, 3600]")
        if not 0 <= self.pause_seconds <= 1:
            raise ConfigError("anchors: pause_seconds must be in [0, 1]")

    @classmethod
    def of(cls, anchoring: AnchoringConfig, confirmations: int) -> AnchorConfig:
        """The anchorer's settings from the broker config's ``anchoring`` section and the
        chain's ``confirmations``."""
        return cls(
            batch_seconds=anchoring.batch_seconds,
            batch_max_leaves=anchoring.batch_max_leaves,
            max_leaves_per_root=anchoring.max_leaves_per_root,
            max_roots_per_hour=anchoring.max_roots_per_hour,
            unsold_batch_seconds=anchoring.unsold_batch_seconds,
            max_pending_leaves_per_seller=anchoring.max_pending_leaves_per_seller,
            confirmations=confirmations,
        )
