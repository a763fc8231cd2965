"""The amqtt release and private method signatures BlendSM overrides, checked at import.

``BlendBroker`` and ``MeteredHandler`` override private methods of amqtt 0.12.1 (the delivery
paths, CONNECT, sessions, in-flight QoS 1/2 and shutdown). A different amqtt could rename or
reshape them and silently bypass the meter, so importing the broker fails loudly instead: every
overridden method is listed here with its parameters. Add an entry with each new override.
"""

from __future__ import annotations

import inspect
from typing import Final

import amqtt
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from blendsm.errors import ConfigError

__all__ = ["AMQTT_VERSION", "check_amqtt_compatibility"]

AMQTT_VERSION: Final = "0.12.1"
"""The amqtt release whose private methods this module overrides."""

_EXPECTED: Final = {
    (Broker, "_client_connected"): ["self", "listener_name", "reader", "writer"],
    (Broker, "_initialize_client_session"): [
        "self",
        "reader",
        "writer",
        "remote_address",
        "remote_port",
    ],
    (Broker, "_authenticate"): ["self", "session", "_"],
    (Broker, "_handle_client_session"): [
        "self",
        "reader",
        "writer",
        "client_session",
        "handler",
        "server",
        "listener_name",
    ],
    (Broker, "_client_message_loop"): ["self", "client_session", "handler"],
    (Broker, "_topic_filtering"): ["self", "session", "topic", "action"],
    (Broker, "_handle_message_delivery"): ["self", "client_session", "handler", "wait_deliver"],
    (Broker, "_handle_subscription"): ["self", "client_session", "handler", "subscribe_waiter"],
    (Broker, "_publish_retained_messages_for_subscription"): ["self", "subscription", "session"],
    (Broker, "_publish_session_retained_messages"): ["self", "session"],
    (Broker, "_retain_broadcast_message"): ["self", "broadcast", "qos", "target_session"],
    (Broker, "retain_message"): ["self", "source_session", "topic_name", "data", "qos"],
    (Broker, "_delete_session"): ["self", "client_id"],
    (Broker, "add_subscription"): ["self", "subscription", "session"],
    (Broker, "_del_subscription"): ["self", "a_filter", "session"],
    (Broker, "_del_all_subscriptions"): ["self", "session"],
    (Broker, "_run_broadcast"): ["self", "running_tasks"],
    (Broker, "_broadcast_loop"): ["self"],
    (Broker, "_session_monitor"): ["self"],
    (Broker, "_handle_disconnect"): ["self", "client_session", "handler", "disconnect_waiter"],
    (Broker, "create_offline_session"): ["self", "client_id"],
    (Broker, "shutdown"): ["self"],
    (Broker, "_create_server_instance"): [
        "self",
        "listener_name",
        "listener_type",
        "address",
        "port",
        "ssl_context",
    ],
    (BrokerProtocolHandler, "mqtt_publish"): [
        "self",
        "topic",
        "data",
        "qos",
        "retain",
        "ack_timeout",
    ],
    (BrokerProtocolHandler, "_send_packet"): ["self", "packet"],
    (BrokerProtocolHandler, "handle_read_timeout"): ["self"],
    (BrokerProtocolHandler, "stop"): ["self"],
    (BrokerProtocolHandler, "start"): ["self"],
    (BrokerProtocolHandler, "_init_session"): ["self", "session"],
    (BrokerProtocolHandler, "_reader_loop"): ["self"],
    (BrokerProtocolHandler, "init_from_connect"): ["reader", "writer", "plugins_manager", "loop"],
    (Session, "_init_states"): ["self"],
    (BrokerProtocolHandler, "_retry_deliveries"): ["self"],
    (BrokerProtocolHandler, "_handle_qos1_message_flow"): ["self", "app_message"],
    (BrokerProtocolHandler, "_handle_qos2_message_flow"): ["self", "app_message"],
    (BrokerProtocolHandler, "handle_puback"): ["self", "puback"],
    (BrokerProtocolHandler, "handle_pubrec"): ["self", "pubrec"],
    (BrokerProtocolHandler, "handle_pubcomp"): ["self", "pubcomp"],
}


def check_amqtt_compatibility() -> None:
    """Raise ConfigError unless amqtt is the release whose internals we override."""
    if amqtt.__version__ != AMQTT_VERSION:
        raise ConfigError(
            f"amqtt {amqtt.__version__} is installed; BlendSM's metering needs exactly"
            f" {AMQTT_VERSION} (pin it): its private delivery paths may have changed"
        )
    for (cls, name), params in _EXPECTED.items():
        found = list(inspect.signature(getattr(cls, name)).parameters)
        if found != params:
            raise ConfigError(f"amqtt {cls.__name__}.{name}{found} changed; expected {params}")


check_amqtt_compatibility()
