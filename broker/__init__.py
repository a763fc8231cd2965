"""blendsm.broker: the broker runtime.

``BlendBroker`` is amqtt's Broker with BlendSM's delivery path: identity and access checked
against the chain view, every delivery gated and metered, vouchers stored durably, claims
settled and message hashes anchored on chain. Run it with :func:`start_broker` from a
:class:`BrokerConfig` (:func:`load_config` reads the YAML), or load
``blendsm.plugins.MarketplacePlugin`` from a plain amqtt config.

Everything here is the package's public API; the ``_``-prefixed modules are private (a test
checks that nothing outside the package imports them).
"""

from __future__ import annotations

from blendsm.broker._access import Identity, Verdict
from blendsm.broker._blend_broker import (
    AMQTT_VERSION,
    BlendBroker,
    MeteredHandler,
    check_amqtt_compatibility,
)
from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import (
    AnchoringConfig,
    BrokerConfig,
    ChainConfig,
    HttpConfig,
    LimitsConfig,
    ListenConfig,
    ListenerConfig,
    MetricsConfig,
    OperatorKeyConfig,
    PaymentsConfig,
    SettlementConfig,
    TlsConfig,
    load_config,
    parse_config,
    resolve_operator_account,
)
from blendsm.broker._config_sessions import SessionsConfig
from blendsm.broker._replay import ReplayConfig
from blendsm.broker._runner import (
    ChainConnection,
    RunningBroker,
    amqtt_config,
    connect_chain,
    served_listeners,
    start_broker,
)
from blendsm.broker._service import MarketplaceService
from blendsm.broker._stats import ServiceStats

__all__ = [
    "AMQTT_VERSION",
    "AnchoringConfig",
    "BlendBroker",
    "BrokerConfig",
    "ChainConfig",
    "ChainConnection",
    "ChainView",
    "HttpConfig",
    "Identity",
    "LimitsConfig",
    "ListenConfig",
    "ListenerConfig",
    "MarketplaceService",
    "MeteredHandler",
    "MetricsConfig",
    "OperatorKeyConfig",
    "PaymentsConfig",
    "ReplayConfig",
    "RunningBroker",
    "ServiceStats",
    "SessionsConfig",
    "SettlementConfig",
    "TlsConfig",
    "Verdict",
    "amqtt_config",
    "check_amqtt_compatibility",
    "connect_chain",
    "load_config",
    "parse_config",
    "resolve_operator_account",
    "served_listeners",
    "start_broker",
]
