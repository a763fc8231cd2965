"""BrokerEndpoint: one checked value for where an SDK client connects, and the old keyword
arguments that still build it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from blendsm.device_sdk import BrokerEndpoint, Publisher, Subscriber, TopicKeyring
from blendsm.errors import ConfigError

KEY = bytes.fromhex("5a" * 32)
OPERATOR = Account.from_key(bytes.fromhex("22" * 32)).address
CONTRACT = "0x" + "ab" * 20
LEGACY: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 1883,
    "broker": OPERATOR.lower(),
    "chain_id": 31337,
    "keepalive": 30,
}


def test_endpoint_and_keywords_configure_the_same_client() -> None:
    endpoint = BrokerEndpoint(**LEGACY)
    assert endpoint.broker == OPERATOR  # checksum form
    new = Subscriber(KEY, endpoint=endpoint, channels_contract=CONTRACT)
    old = Subscriber(KEY, channels_contract=CONTRACT, **LEGACY)
    for sub in (new, old):
        assert (sub.host, sub.port, sub.broker, sub.chain_id, sub.keepalive) == (
            "127.0.0.1",
            1883,
            OPERATOR,
            31337,
            30,
        )
    assert new.endpoint == old.endpoint == endpoint
    assert new.client_id != old.client_id  # None: each client draws its own


def test_every_client_takes_an_endpoint(tmp_path: Path) -> None:
    endpoint = BrokerEndpoint("127.0.0.1", 1883, OPERATOR, 31337, client_id="dev-1")
    pub = Publisher(KEY, endpoint=endpoint, registry=CONTRACT, state_dir=tmp_path)
    try:
        assert pub.client_id == "dev-1"
        assert pub.domain.chain_id == 31337
    finally:
        pub.close()
    ring = TopicKeyring(KEY, endpoint=endpoint, topics={"t/1": OPERATOR})
    assert ring.endpoint is endpoint


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("port", True),
        ("keepalive", -1),
        ("client_id", ""),
        ("chain_id", -1),
        ("broker", "0x1234"),
    ],
)
def test_bad_fields_are_config_errors(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        BrokerEndpoint(**{**LEGACY, field: value})


def test_endpoint_or_keywords_not_both() -> None:
    with pytest.raises(ConfigError, match="not both"):
        Subscriber(
            KEY,
            endpoint=BrokerEndpoint(**LEGACY),
            channels_contract=CONTRACT,
            port=1884,
        )


def test_missing_or_unknown_keywords_are_type_errors() -> None:
    with pytest.raises(TypeError, match="'host'"):
        Subscriber(KEY, channels_contract=CONTRACT, port=1883, broker=OPERATOR, chain_id=1)
    with pytest.raises(TypeError, match="'hots'"):
        Subscriber(KEY, channels_contract=CONTRACT, hots="x", **LEGACY)  # type: ignore[call-arg]
