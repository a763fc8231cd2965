"""BrokerEndpoint: one checked value for where an SDK client connects, and the old keyword
arguments that still build it."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from support import TestCA

from blendsm.device_sdk import BrokerEndpoint, ClientTls, Publisher, Subscriber, TopicKeyring
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


def test_transport_and_tls_are_part_of_the_endpoint(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    mine = ca.issue("client", "gateway-17", server=False)
    tls = ClientTls(ca_certs=str(ca.cert), certfile=str(mine.cert), keyfile=str(mine.key))
    endpoint = BrokerEndpoint(**LEGACY, transport="websockets", tls=tls, ws_path="/mqtt")
    assert (endpoint.transport, endpoint.tls, endpoint.ws_path) == ("websockets", tls, "/mqtt")
    context = tls.context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert Subscriber(KEY, channels_contract=CONTRACT, **LEGACY, tls=tls).endpoint.tls == tls
    plain = BrokerEndpoint(**LEGACY)
    assert (plain.transport, plain.tls) == ("tcp", None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transport": "udp"}, "transport: must be one of tcp, websockets"),
        ({"ws_path": "mqtt"}, "ws_path: must be a str starting with '/'"),
        ({"tls": {"ca_certs": "ca.crt"}}, "tls: must be a ClientTls"),
        ({"tls": ClientTls(ca_certs="/no/such/ca.crt")}, r"tls\.ca_certs: no such file"),
    ],
)
def test_bad_transport_or_tls_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerEndpoint(**LEGACY, **options)


def test_a_key_without_its_certificate_or_not_matching_is_refused(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    one, two = ca.issue("one", "a", server=False), ca.issue("two", "b", server=False)
    with pytest.raises(ConfigError, match=r"tls\.keyfile: given without tls\.certfile"):
        BrokerEndpoint(**LEGACY, tls=ClientTls(keyfile=str(one.key)))
    mismatched = ClientTls(ca_certs=str(ca.cert), certfile=str(one.cert), keyfile=str(two.key))
    with pytest.raises(ConfigError, match="tls: cannot use"):
        mismatched.context()
