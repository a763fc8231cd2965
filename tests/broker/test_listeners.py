"""How our listeners reach amqtt: exactly as configured. amqtt 0.12.1 copies the ``default``
listener's settings into every other listener whose setting equals amqtt's own default, so a
listener on 0.0.0.0:1883 (amqtt's default bind) would silently take another bind (or none),
and a tcp listener would turn into a WebSocket one next to a ws listener named ``default``."""

from __future__ import annotations

from blendsm.broker import BlendBroker, BrokerConfig, amqtt_config, parse_config, served_listeners


def _broker(config: BrokerConfig) -> BlendBroker:
    """Constructed, not started (no marketplace service: no plugin)."""
    amqtt = {"listeners": amqtt_config(config)["listeners"], "plugins": {}}
    return BlendBroker(amqtt, listeners=served_listeners(config))


def _listeners(broker: BlendBroker) -> dict[str, tuple[str, str | None]]:
    return {name: (str(x.type), x.bind) for name, x in broker.listeners_config.items()}


async def test_a_listener_on_amqtts_default_bind_keeps_it() -> None:
    config = parse_config(
        {
            "listeners": {
                "ws": {"type": "ws", "port": 8080},
                "all": {"host": "0.0.0.0", "port": 1883},
            }
        }
    )
    broker = _broker(config)
    assert _listeners(broker) == {"ws": ("ws", "127.0.0.1:8080"), "all": ("tcp", "0.0.0.0:1883")}


async def test_a_ws_listener_named_default_leaves_the_others_tcp() -> None:
    config = parse_config(
        {"listeners": {"default": {"type": "ws", "port": 8080}, "mqtt": {"port": 1884}}}
    )
    broker = _broker(config)
    assert _listeners(broker) == {
        "default": ("ws", "127.0.0.1:8080"),
        "mqtt": ("tcp", "127.0.0.1:1884"),
    }


async def test_listen_alone_is_amqtts_default_listener() -> None:
    config = parse_config({"listen": {"host": "0.0.0.0", "port": 1883}})
    broker = _broker(config)
    assert _listeners(broker) == {"default": ("tcp", "0.0.0.0:1883")}
