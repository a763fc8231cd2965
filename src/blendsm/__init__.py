"""BlendSM: a decentralized IoT data marketplace on MQTT.

Subpackages: :mod:`blendsm.device_sdk` (edge SDK and wire protocol, light),
:mod:`blendsm.contracts` (Solidity artifacts, deploy and chain bindings),
:mod:`blendsm.broker` (runner, CLI, chain client) and :mod:`blendsm.plugins`
(amqtt plugins).
"""

from __future__ import annotations

from blendsm.errors import BlendsmError

__all__ = ["BlendsmError", "__version__"]

__version__ = "0.1.0"
