"""blendsm.cli: the ``blendsm`` command line.

One module per command (``_deploy``, ``_broker``, ``_node``, ``_registry``, ``_market``,
``_channel``, ``_rate``, ``_anchors``, ``_verify``, ``_contracts``, ``_demo``), the plumbing
they share in ``_support``. The command line is a client of the other packages: it reaches
them only through their public APIs, so it can move or grow without touching them.
"""

from __future__ import annotations

from blendsm.cli._main import main

__all__ = ["main"]
