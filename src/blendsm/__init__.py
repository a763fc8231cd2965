"""BlendSM: a decentralized IoT data marketplace on MQTT.

Subpackages: :mod:`blendsm.device_sdk` (edge SDK and wire protocol, light),
:mod:`blendsm.contracts` (Solidity artifacts, deploy and chain bindings),
:mod:`blendsm.broker` (runner, chain client), :mod:`blendsm.plugins`
(amqtt plugins) and :mod:`blendsm.cli` (the ``blendsm`` command line).
"""

from __future__ import annotations

from blendsm._backoff import Jitter, backoff_delay
from blendsm._files import atomic_write_text
from blendsm.errors import BlendsmError

__all__ = ["BlendsmError", "Jitter", "__version__", "atomic_write_text", "backoff_delay"]

__version__ = "0.1.0"
