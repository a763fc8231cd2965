"""The broker config loader: defaults, validation with dotted paths, no inline keys,
and the documented example in docs/broker-config.md always parses."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from eth_account import Account
from support import TestCA

from blendsm.broker._config import (
    AnchoringConfig,
    BrokerConfig,
    ChainConfig,
    ListenConfig,
    ListenerConfig,
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
from blendsm.device_sdk import UINT256_MAX
from blendsm.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "broker-config.md"
KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
NODE = {"endpoint": "http://127.0.0.1:8545", "deployment": "deployment.json"}


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_empty_mapping_gives_all_defaults() -> None:
    config = parse_config({})
    assert config == BrokerConfig()
    assert config.listen == ListenConfig("127.0.0.1", 1883)
    assert config.chain.endpoint == "embedded"
    assert config.chain.confirmations == 2
    assert config.operator_key is None
    assert config.payments.credit_messages == 5
    assert (config.payments.hold_messages, config.payments.hold_seconds) == (10_000, 5.0)
    assert config.public_topics is False
    assert config.data_dir == Path("blendsm-data")
    assert config.log_level == "INFO"


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "DEBUG"  # type: ignore[misc]


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "# nothing\n"))
    assert config.listen == ListenConfig()
    assert config.data_dir == tmp_path / "blendsm-data"
    config = load_config(_write(tmp_path, "listen:\npayments:\n  settlement:\n"))
    assert config.payments == PaymentsConfig()


# --------------------------------------------------------------------------- the doc


def test_documented_example_parses_and_covers_every_field(tmp_path: Path) -> None:
    example = _yaml_blocks()[0]
    config = load_config(_write(tmp_path, example))
    assert config.chain == ChainConfig(
        endpoint="http://127.0.0.1:8545",
        deployment=tmp_path / "deployment.json",
        confirmations=2,
        poll_interval=2.0,
    )
    assert config.operator_key == OperatorKeyConfig(env="BLENDSM_OPERATOR_KEY")
    # Every value the example writes (outside chain/operator_key) is the code's default.
    assert config.listen == ListenConfig()
    assert config.payments == PaymentsConfig()
    assert config.sessions == SessionsConfig()
    assert config.replay == ReplayConfig()
    assert config.data_dir == tmp_path / "blendsm-data"
    assert (config.public_topics, config.log_level) == (False, "INFO")
    # Every field of the tree appears in the example, live or commented out.
    assert config.anchoring == AnchoringConfig()
    for cls in (
        BrokerConfig,
        ListenConfig,
        ChainConfig,
        OperatorKeyConfig,
        PaymentsConfig,
        AnchoringConfig,
    ):
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\s*#?\s*{f.name}:", example, flags=re.M), f.name
    for f in dataclasses.fields(SettlementConfig):
        assert f"{f.name}:" in example
    for f in dataclasses.fields(SessionsConfig):
        assert re.search(rf"^\s+{f.name}:", example, flags=re.M), f.name
    for f in dataclasses.fields(ReplayConfig):
        assert re.search(rf"^\s+{f.name}:", example, flags=re.M), f.name


def test_sessions_section_is_bounded() -> None:
    config = parse_config({"sessions": {"expiry_seconds": 0.5, "max_queued_bytes": 4096}})
    assert config.sessions == SessionsConfig(expiry_seconds=0.5, max_queued_bytes=4096)
    assert _error({"sessions": {"expiry_seconds": 0}}).startswith("sessions.expiry_seconds:")
    assert "<= 2592000" in _error({"sessions": {"expiry_seconds": 31 * 86_400}})
    assert _error({"sessions": {"max_per_identity": 0}}).startswith("sessions.max_per_identity:")
    assert "<= 65535" in _error({"sessions": {"max_inflight_messages": 65_536}})
    assert _error({"sessions": {"max_queued_bytes": 1023}}).startswith("sessions.max_queued_bytes:")
    assert "sessions.max_queued_message" in _error({"sessions": {"max_queued_message": 5}})


def test_documented_small_examples_parse(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "certs")  # the files the listeners example names
    ca.issue("server", "127.0.0.1", server=True)
    for block in _yaml_blocks()[1:]:
        load_config(_write(tmp_path, block))


def test_documented_listeners_example_covers_every_field(tmp_path: Path) -> None:
    TestCA(tmp_path / "certs").issue("server", "127.0.0.1", server=True)
    (block,) = [b for b in _yaml_blocks() if b.startswith("listeners:")]
    config = load_config(_write(tmp_path, block))
    assert [x.scheme for x in config.listeners] == ["mqtt", "mqtts", "wss"]
    for cls in (ListenerConfig, TlsConfig):
        for f in dataclasses.fields(cls):
            assert f.name == "name" or f"{f.name}:" in block, f.name


# --------------------------------------------------------------------------- full config


def test_full_config_parses_with_paths_resolved(tmp_path: Path) -> None:
    text = f"""
listen: {{host: 0.0.0.0, port: 0}}
chain:
  endpoint: wss://node.example.org/ws
  deployment: sub/deployment.json
  confirmations: 0
  poll_interval: 1
operator_key:
  keystore: /abs/operator.json
  password_env: OP_PASS
payments:
  credit_messages: 1
  settlement:
    threshold: "{UINT256_MAX}"
    interval_seconds: 0.5
    before_close_margin_seconds: 0
    min_gas_balance_wei: 1_000
data_dir: ~/state
public_topics: true
log_level: debug
"""
    config = load_config(_write(tmp_path, text))
    assert config.listen == ListenConfig("0.0.0.0", 0)
    assert config.chain.deployment == tmp_path / "sub" / "deployment.json"
    assert config.chain.confirmations == 0
    assert config.chain.poll_interval == 1.0
    assert config.operator_key == OperatorKeyConfig(
        keystore=Path("/abs/operator.json"), password_env="OP_PASS"
    )
    assert config.payments.settlement == SettlementConfig(UINT256_MAX, 0.5, 0.0, 1000)
    assert config.data_dir == Path("~/state").expanduser()
    assert config.public_topics is True
    assert config.log_level == "DEBUG"


def test_parse_config_keeps_relative_paths_without_base_dir() -> None:
    config = parse_config({"chain": NODE, "operator_key": {"env": "K"}, "data_dir": "d"})
    assert config.chain.deployment == Path("deployment.json")
    assert config.data_dir == Path("d")
    config = parse_config({"data_dir": "d"}, base_dir="/etc/blendsm")
    assert config.data_dir == Path("/etc/blendsm/d")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"payments": {"settlement": {"interval_seconds": -1}}},
            "payments.settlement.interval_seconds: must be > 0, got -1",
        ),
        ({"payments": {"settlement": {"interval_seconds": 0}}}, "interval_seconds: must be > 0"),
        ({"payments": {"credit_messages": 0}}, "payments.credit_messages: must be >= 1, got 0"),
        ({"payments": {"credit_messages": "5"}}, "payments.credit_messages: must be int"),
        ({"payments": {"credit_messages": True}}, "payments.credit_messages: must be int"),
        ({"payments": {"hold_messages": -1}}, "payments.hold_messages: must be >= 0, got -1"),
        ({"payments": {"hold_messages": 10_001}}, "payments.hold_messages: must be <= 10000"),
        ({"payments": {"hold_seconds": 0}}, "payments.hold_seconds: must be > 0"),
        ({"payments": {"hold_seconds": 61}}, "payments.hold_seconds: must be <= 60, got 61"),
        (
            {"payments": {"intake": {"unawaited_linger_seconds": 2}}},
            "payments.intake.unawaited_linger_seconds: must be <= 1, got 2",
        ),
        (
            {"payments": {"intake": {"unawaited_linger_seconds": -0.1}}},
            "payments.intake.unawaited_linger_seconds",
        ),
        ({"listen": {"port": 70000}}, "listen.port: must be <= 65535, got 70000"),
        ({"listen": {"port": -1}}, "listen.port: must be >= 0"),
        ({"listen": {"host": ""}}, "listen.host: must not be empty"),
        ({"listen": {"host": 5}}, "listen.host: must be str"),
        ({"listen": [1]}, "listen: must be a mapping, got list"),
        ({"chain": {"confirmations": -1}}, "chain.confirmations: must be >= 0, got -1"),
        ({"chain": {"confirmations": 1.5}}, "chain.confirmations: must be int"),
        ({"chain": {"poll_interval": 0}}, "chain.poll_interval: must be > 0"),
        ({"chain": {"poll_interval": float("nan")}}, "chain.poll_interval: must be finite"),
        ({"chain": {"poll_interval": "2"}}, "chain.poll_interval: must be a number of seconds"),
        ({"chain": {"max_staleness": 0}}, "chain.max_staleness: must be > 0"),
        (
            {"chain": {"poll_interval": 3, "max_staleness": 3}},
            "chain.max_staleness: must exceed chain.poll_interval (3 s), got 3",
        ),
        ({"chain": {"endpoint": "ftp://x"}}, "chain.endpoint: must be 'embedded' or an http(s)"),
        ({"chain": {"endpoint": "http://"}}, "chain.endpoint:"),
        ({"chain": {"endpoint": "http://n:8545"}}, "chain.deployment: required"),
        ({"chain": {"deployment": "d.json"}}, "chain.deployment: not used with the embedded"),
        ({"chain": {"deployment": ""}}, "chain.deployment: must be a non-empty path"),
        ({"chain": NODE}, "operator_key: required when chain.endpoint is not embedded"),
        (
            {"payments": {"settlement": {"before_close_margin_seconds": -5}}},
            "payments.settlement.before_close_margin_seconds: must be >= 0, got -5",
        ),
        ({"public_topics": "yes"}, "public_topics: must be bool"),
        ({"public_topics": 1}, "public_topics: must be bool"),
        ({"log_level": "LOUD"}, "log_level: must be one of"),
        ({"data_dir": 3}, "data_dir: must be a non-empty path"),
        (
            {"limits": {"connect_timeout_seconds": 0}},
            "limits.connect_timeout_seconds: must be > 0, got 0",
        ),
        (
            {"limits": {"connect_timeout_seconds": 3601}},
            "limits.connect_timeout_seconds: must be <= 3600, got 3601",
        ),
        ({"limits": {"connect_timout_seconds": 5}}, "did you mean 'connect_timeout_seconds'?"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections: must be >= 1, got 0"),
        (
            {"anchoring": {"max_roots_per_hour": 0}},
            "anchoring.max_roots_per_hour: must be >= 1, got 0",
        ),
        (
            {"anchoring": {"max_roots_per_hour": 3601}},
            "anchoring.max_roots_per_hour: must be <= 3600, got 3601",
        ),
        (
            {"anchoring": {"max_leaves_per_root": 2**20 + 1}},
            "anchoring.max_leaves_per_root: must be <= 1048576, got 1048577",
        ),
        (
            {"anchoring": {"unsold_batch_seconds": -1}},
            "anchoring.unsold_batch_seconds: must be >= 0, got -1",
        ),
        (
            {"anchoring": {"max_pending_leaves_per_seller": 0}},
            "anchoring.max_pending_leaves_per_seller: must be >= 1, got 0",
        ),
        ({"limits": {"max_connections_per_ip": "9"}}, "limits.max_connections_per_ip: must be int"),
        ({"limits": {"connect_rate_per_ip": 0}}, "limits.connect_rate_per_ip: must be > 0, got 0"),
        (
            {"limits": {"connect_rate_per_ip": "fast"}},
            "limits.connect_rate_per_ip: must be a number per second, got str",
        ),
        ({"limits": {"connect_burst_per_ip": 0}}, "limits.connect_burst_per_ip: must be >= 1"),
        ({"limits": {"max_packet_bytes": 511}}, "limits.max_packet_bytes: must be >= 512, got 511"),
        ({"limits": {"max_packet_bytes": 2**28 + 5}}, "limits.max_packet_bytes: must be <="),
        ({"limits": {"shutdown_seconds": 0}}, "limits.shutdown_seconds: must be > 0, got 0"),
        ({"limits": {"shutdown_seconds": 601}}, "limits.shutdown_seconds: must be <= 600, got 601"),
        (
            {"limits": {"max_filters_per_session": 0}},
            "limits.max_filters_per_session: must be >= 1, got 0",
        ),
        (
            {"limits": {"max_filters_per_identity": 10**7}},
            "limits.max_filters_per_identity: must be <= 1000000",
        ),
    ],
)
def test_invalid_values_name_the_dotted_path(data: dict[str, Any], expected: str) -> None:
    assert expected in _error(data)


def test_root_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="config: must be a mapping"):
        parse_config([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listn": {}}, "listn: unknown key; did you mean 'listen'?"),
        (
            {"payments": {"credit_message": 3}},
            "payments.credit_message: unknown key; did you mean 'credit_messages'?",
        ),
        (
            {"payments": {"settlement": {"interval": 5}}},
            "payments.settlement.interval: unknown key; did you mean 'interval_seconds'?",
        ),
        (
            {"chain": {"confirmation": 1}},
            "chain.confirmation: unknown key; did you mean 'confirmations'?",
        ),
        ({"listen": {"zzz": 1}}, "listen.zzz: unknown key; known keys: host, port"),
        ({"public-topics": True}, "public-topics: unknown key; did you mean 'public_topics'?"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(data: dict[str, Any], expected: str) -> None:
    assert expected in _error(data)


@pytest.mark.parametrize("value", [0, "0", 10**18, "1000000000000000000", " 42 ", UINT256_MAX])
def test_amounts_accept_ints_and_decimal_strings(value: int | str) -> None:
    config = parse_config({"payments": {"settlement": {"threshold": value}}})
    assert config.payments.settlement.threshold == int(str(value).strip())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, "floats lose precision"),
        (1e18, "floats lose precision"),
        (-1, "must be >= 0, got -1"),
        ("-1", "digits only"),
        ("1e18", "digits only"),
        ("0x10", "digits only"),
        ("1.0", "digits only"),
        ("", "digits only"),
        (UINT256_MAX + 1, "must fit in uint256"),
        (str(UINT256_MAX + 1), "must fit in uint256"),
        (True, "must be an integer or a decimal string"),
        ([1], "must be an integer or a decimal string"),
    ],
)
def test_amounts_refuse_floats_and_junk(value: object, expected: str) -> None:
    message = _error({"payments": {"settlement": {"min_gas_balance_wei": value}}})
    assert message.startswith("payments.settlement.min_gas_balance_wei: ")
    assert expected in message


def test_float_amount_from_yaml_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "payments:\n  settlement:\n    threshold: 1.0e+18\n")
    with pytest.raises(ConfigError, match=r"payments\.settlement\.threshold: floats lose"):
        load_config(path)


# --------------------------------------------------------------------------- operator key


@pytest.mark.parametrize(
    ("operator_key", "expected"),
    [
        ({}, "operator_key: give exactly one of env"),
        ({"env": "A", "keystore": "k.json", "password_env": "P"}, "give exactly one of env"),
        ({"keystore": "k.json"}, "operator_key.password_env: required with"),
        ({"env": "A", "password_env": "P"}, "operator_key.password_env: only used with"),
        ({"env": "not a name"}, "operator_key.env: must be an environment variable name"),
        ({"env": 5}, "operator_key.env: must be an environment variable name"),
        ({"key": "x"}, "operator_key.key: unknown key"),
        ("BLENDSM_KEY", "keys go in environment variables or keystores"),
    ],
)
def test_operator_key_shapes(operator_key: object, expected: str) -> None:
    assert expected in _error({"chain": NODE, "operator_key": operator_key})


@pytest.mark.parametrize(
    ("broker_key", "expected"),
    [
        ({"env": "not a name"}, "broker_key.env: must be an environment variable name"),
        (
            {"keystore": "k.json", "password_env": 5},
            "broker_key.password_env: must be an environment variable name",
        ),
    ],
)
def test_broker_key_errors_name_the_broker_key(broker_key: object, expected: str) -> None:
    """The error names the section that is wrong (it said ``operator_key`` for both)."""
    assert expected in _error(
        {"chain": NODE, "operator_key": {"env": "OPERATOR"}, "broker_key": broker_key}
    )


@pytest.mark.parametrize(
    "data",
    [
        {"operator_key": {"env": KEY}},
        {"operator_key": {"env": "0x" + KEY}},
        {"operator_key": {"private_key": KEY}},
        {"chain": {"endpoint": "http://n/" + KEY}},
        {"notes": ["fine", {"deep": "0X" + KEY.upper()}]},
        {KEY: 1},
    ],
)
def test_inline_private_keys_are_refused_anywhere(data: dict[str, Any]) -> None:
    message = _error(data)
    assert "private key" in message
    assert "environment variable" in message
    assert "keystore" in message
    assert KEY not in message.lower()


def test_inline_private_key_in_file_refused_with_line(tmp_path: Path) -> None:
    # Unquoted 0x... would become an int in YAML; comments count too.
    for text in (
        f"chain:\n  confirmations: 2\noperator_key:\n  env: 0x{KEY}\n",
        f"# old key: {KEY}\n",
        f"log_level: '{KEY}'\n",
    ):
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text))
        assert "private key" in str(info.value)
        assert KEY not in str(info.value)
    with pytest.raises(ConfigError, match=r"broker\.yaml:4: "):
        load_config(
            _write(tmp_path, f"chain:\n  confirmations: 2\noperator_key:\n  env: 0x{KEY}\n")
        )


def test_shorter_or_longer_hex_is_not_a_key() -> None:
    address = "0x" + KEY[:40]
    config = parse_config({"listen": {"host": address}})
    assert config.listen.host == address
    parse_config({"payments": {"settlement": {"threshold": str(UINT256_MAX)}}})  # 78 digits


def test_resolve_operator_account_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"chain": NODE, "operator_key": {"env": "BLENDSM_TEST_OP_KEY"}})
    monkeypatch.delenv("BLENDSM_TEST_OP_KEY", raising=False)
    with pytest.raises(ConfigError, match="BLENDSM_TEST_OP_KEY is not set"):
        resolve_operator_account(config)
    monkeypatch.setenv("BLENDSM_TEST_OP_KEY", "0x" + KEY)
    account = resolve_operator_account(config)
    assert account is not None
    assert account.address == Account.from_key(KEY).address


def test_resolve_operator_account_from_keystore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keystore = Account.encrypt(KEY, "pw", kdf="pbkdf2", iterations=2)
    (tmp_path / "op.json").write_text(json.dumps(keystore))
    text = (
        "chain:\n  endpoint: http://n:8545\n  deployment: d.json\n"
        "operator_key:\n  keystore: op.json\n  password_env: BLENDSM_TEST_OP_PW\n"
    )
    config = load_config(_write(tmp_path, text))
    monkeypatch.setenv("BLENDSM_TEST_OP_PW", "pw")
    account = resolve_operator_account(config)
    assert account is not None
    assert account.address == Account.from_key(KEY).address


def test_resolve_operator_account_none_on_embedded() -> None:
    assert resolve_operator_account(parse_config({})) is None


# --------------------------------------------------------------------------- files


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen:\n  host: a\n  port: [1, 2\nlog_level: INFO\n")
    with pytest.raises(ConfigError, match=r"broker\.yaml:\d+:\d+: invalid YAML") as info:
        load_config(path)
    line = int(str(info.value).split("broker.yaml:")[1].split(":")[0])
    assert line in (3, 4)
    with pytest.raises(yaml.YAMLError):  # the same text really is invalid
        yaml.safe_load(path.read_text())


def test_duplicate_keys_refused_with_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen:\n  port: 1\n  port: 2\n")
    with pytest.raises(
        ConfigError, match=r"broker\.yaml:3:\d+: invalid YAML: duplicate key 'port'"
    ):
        load_config(path)


def test_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config: must be a mapping, got list"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_anchoring_budget_parses() -> None:
    config = parse_config(
        {
            "anchoring": {
                "max_roots_per_hour": 12,
                "max_leaves_per_root": 5000,
                "unsold_batch_seconds": 0,
                "max_pending_leaves_per_seller": 50,
            }
        }
    )
    assert config.anchoring == AnchoringConfig(
        max_roots_per_hour=12,
        max_leaves_per_root=5000,
        unsold_batch_seconds=0.0,
        max_pending_leaves_per_seller=50,
    )


def test_limits_default_and_parse() -> None:
    assert parse_config({}).limits.connect_timeout_seconds == 10.0
    limits = parse_config({"limits": {"connect_timeout_seconds": 2.5}}).limits
    assert limits.connect_timeout_seconds == 2.5
    capped = parse_config({"limits": {"max_connections": 50, "max_connections_per_ip": 5}})
    assert (capped.limits.max_connections, capped.limits.max_connections_per_ip) == (50, 5)
    assert parse_config({}).limits.max_connections_per_ip == 1000
    default = parse_config({}).limits
    assert (default.connect_rate_per_ip, default.connect_burst_per_ip) == (50.0, 1000)
    assert (default.max_packet_bytes, default.shutdown_seconds) == (1_048_576, 10.0)
    set_ = parse_config(
        {
            "limits": {
                "connect_rate_per_ip": 2,
                "connect_burst_per_ip": 7,
                "max_packet_bytes": 4096,
                "shutdown_seconds": 3,
            }
        }
    ).limits
    assert (set_.connect_rate_per_ip, set_.connect_burst_per_ip) == (2.0, 7)
    assert (set_.max_packet_bytes, set_.shutdown_seconds) == (4096, 3.0)


def test_filter_caps_default_and_parse() -> None:
    default = parse_config({}).limits
    assert (default.max_filters_per_session, default.max_filters_per_identity) == (100, 1000)
    limits = parse_config(
        {"limits": {"max_filters_per_session": 3, "max_filters_per_identity": 5}}
    ).limits
    assert (limits.max_filters_per_session, limits.max_filters_per_identity) == (3, 5)


def test_max_staleness_defaults_to_five_polls_and_at_least_ten_seconds() -> None:
    assert parse_config({}).chain.staleness_limit == 10.0
    assert parse_config({"chain": {"poll_interval": 4}}).chain.staleness_limit == 20.0
    chain = parse_config({"chain": {"poll_interval": 4, "max_staleness": 4.5}}).chain
    assert chain.max_staleness == 4.5
    assert chain.staleness_limit == 4.5
