"""``python -m blendsm.cli``: the ``blendsm`` command without the installed script."""

from __future__ import annotations

import sys

from blendsm.cli import main

sys.exit(main())
