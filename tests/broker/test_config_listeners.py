"""``listeners:`` and the ``tls:`` sections: parsed in file order, ``listen:`` still the default
plain listener, and every mistake refused at load time naming the field (missing or unreadable
files, a key that is not the certificate's, duplicate ports, unknown types)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from support import TestCA

from blendsm.broker import ListenerConfig, TlsConfig, load_config, parse_config, served_listeners
from blendsm.broker._config_listeners import server_ssl_context
from blendsm.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    server = ca.issue("server", "127.0.0.1", server=True)
    other = ca.issue("other", "other", server=True)
    return {"ca": ca.cert, "cert": server.cert, "key": server.key, "other_key": other.key}


def _tls(pki: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"certfile": str(pki["cert"]), "keyfile": str(pki["key"]), **extra}


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_listen_alone_is_the_default_plain_listener() -> None:
    config = parse_config({"listen": {"port": 1999}})
    assert config.listeners == ()
    assert served_listeners(config) == (ListenerConfig("default", "tcp", "127.0.0.1", 1999),)
    assert served_listeners(parse_config({}))[0].port == 1883


def test_listeners_in_file_order_with_tls(pki: dict[str, Path]) -> None:
    config = parse_config(
        {
            "listeners": {
                "plain": {"port": 1883},
                "tls": {"port": 8883, "host": "0.0.0.0", "tls": _tls(pki)},
                "ws": {"type": "ws", "port": 8080},
                "wss": {
                    "type": "ws",
                    "port": 8443,
                    "tls": _tls(pki, cafile=str(pki["ca"]), require_client_cert=True),
                },
            }
        }
    )
    assert [x.name for x in served_listeners(config)] == ["plain", "tls", "ws", "wss"]
    assert [x.scheme for x in config.listeners] == ["mqtt", "mqtts", "ws", "wss"]
    assert config.listeners[1].tls == TlsConfig(pki["cert"], pki["key"])
    wss = config.listeners[3].tls
    assert wss is not None
    assert wss.require_client_cert
    assert wss.cafile == pki["ca"]


def test_relative_tls_paths_resolve_against_the_config_folder(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("cert", "key"):
        (tmp_path / f"{name}.pem").write_bytes(pki[name].read_bytes())
    path = tmp_path / "broker.yaml"
    path.write_text(
        "listeners:\n  tls:\n    port: 0\n    tls: {certfile: cert.pem, keyfile: key.pem}\n"
        "http:\n  port: 0\n  tls: {certfile: cert.pem, keyfile: key.pem}\n"
    )
    config = load_config(path)
    assert config.listeners[0].tls == TlsConfig(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert config.http.tls == TlsConfig(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert config.metrics.tls is None


def test_server_context_is_tls12_at_least_and_requires_client_certs_when_asked(
    pki: dict[str, Path],
) -> None:
    plain = server_ssl_context(TlsConfig(pki["cert"], pki["key"]), "x")
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    optional = server_ssl_context(TlsConfig(pki["cert"], pki["key"], pki["ca"]), "x")
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = server_ssl_context(
        TlsConfig(pki["cert"], pki["key"], pki["ca"], require_client_cert=True, min_version="1.3"),
        "x",
    )
    assert required.verify_mode == ssl.CERT_REQUIRED
    assert required.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"listen": {"port": 1}, "listeners": {"a": {"port": 2}}},
            "listen: give either listen (one plain TCP listener) or listeners, not both",
        ),
        ({"listeners": {}}, "listeners: must name at least one listener"),
        ({"listeners": [{"port": 1}]}, "listeners: must be a mapping, got list"),
        ({"listeners": {"a": {"type": "udp", "port": 1}}}, "listeners.a.type: must be one of tcp"),
        ({"listeners": {"a": {"host": "127.0.0.1"}}}, "listeners.a.port: required"),
        ({"listeners": {"a": {"port": 70000}}}, "listeners.a.port: must be <= 65535"),
        ({"listeners": {"a": {"prot": 1}}}, "listeners.a.prot: unknown key; did you mean 'port'?"),
        ({"listeners": {"a": {"name": "b", "port": 1}}}, "listeners.a.name: unknown key"),
        ({"listeners": {"a b": {"port": 1}}}, "listeners.a b: a listener name is"),
        (
            {"listeners": {"a": {"port": 1883}, "b": {"type": "ws", "port": 1883}}},
            "listeners.b.port: 1883 is already listeners.a's port",
        ),
        (
            {"listeners": {"a": {"port": 1883, "host": "0.0.0.0"}, "b": {"port": 1883}}},
            "listeners.b.port: 1883 is already listeners.a's port (on every interface)",
        ),
        ({"listeners": {"a": {"port": 1, "tls": "on"}}}, "listeners.a.tls: must be a mapping"),
        ({"listeners": {"a": {"port": 1, "tls": {}}}}, "listeners.a.tls.certfile: required"),
        ({"http": {"port": 1, "tls": {"certfile": "c"}}}, "http.tls.keyfile: required"),
    ],
)
def test_listener_mistakes_are_refused_naming_the_field(data: dict[str, Any], message: str) -> None:
    assert message in _error(data)


def test_two_listeners_on_port_0_are_not_a_clash() -> None:
    config = parse_config({"listeners": {"a": {"port": 0}, "b": {"type": "ws", "port": 0}}})
    assert [x.port for x in config.listeners] == [0, 0]


def test_tls_file_mistakes_are_refused_at_load(pki: dict[str, Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    where = "listeners.tls.tls"

    def error(**tls: Any) -> str:
        return _error({"listeners": {"tls": {"port": 0, "tls": tls}}})

    assert f"{where}.certfile: cannot read {missing}" in error(certfile=missing, keyfile="k")
    assert f"{where}.keyfile: cannot read {missing}" in error(
        certfile=str(pki["cert"]), keyfile=missing
    )
    assert "are not a PEM certificate and its matching private key" in error(
        certfile=str(pki["cert"]), keyfile=str(pki["other_key"])
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "are not a PEM certificate" in error(certfile=str(garbage), keyfile=str(pki["key"]))
    assert f"{where}.cafile: {garbage} holds no PEM CA certificate" in error(
        **_tls(pki, cafile=str(garbage))
    )
    assert f"{where}.require_client_cert: needs {where}.cafile" in error(
        **_tls(pki, require_client_cert=True)
    )
    assert f"{where}.min_version: must be one of 1.2, 1.3, got '1.1'" in error(
        **_tls(pki, min_version="1.1")
    )
    assert f"{where}.require_client_cert: must be bool" in error(
        **_tls(pki, require_client_cert="yes")
    )
    assert "metrics.tls.cafile: cannot read" in _error(
        {"metrics": {"port": 0, "tls": _tls(pki, cafile=missing)}}
    )


def test_an_encrypted_keyfile_is_refused_without_a_prompt(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki["key"].read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = _error(
        {
            "listeners": {
                "t": {"port": 0, "tls": {"certfile": str(pki["cert"]), "keyfile": str(locked)}}
            }
        }
    )
    assert "listeners.t.tls.keyfile:" in message
    assert "encrypted with a passphrase" in message
