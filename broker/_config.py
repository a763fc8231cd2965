"""The broker's configuration: a frozen dataclass tree, loaded from YAML and validated.

``load_config(path)`` reads a YAML file (PyYAML ``safe_load``); ``parse_config(mapping)``
validates an already-parsed mapping. Both raise :class:`~blendsm.errors.ConfigError` whose
message starts with the dotted path of the offending field, e.g.
``payments.settlement.interval_seconds: must be > 0, got -1``.

Secrets never live in the file: the operator key is named by an environment variable or
a keystore file, and anything that looks like a private key (64 hex digits, with or
without ``0x``) anywhere in the YAML is refused. :func:`resolve_operator_account` turns
the key reference into an account, so loading the config does not need the secret.

Relative paths (``chain.deployment``, ``operator_key.keystore``, ``data_dir``) are
resolved against the config file's folder by :func:`load_config`, or against
``base_dir`` when given to :func:`parse_config`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import yaml  # type: ignore[import-untyped]
from eth_account.signers.local import LocalAccount

from blendsm.device_sdk import UINT256_MAX, account_from_env, account_from_keystore
from blendsm.errors import ConfigError

__all__ = [
    "EMBEDDED",
    "LOG_LEVELS",
    "AnchoringConfig",
    "BrokerConfig",
    "ChainConfig",
    "HttpConfig",
    "ListenConfig",
    "MetricsConfig",
    "OperatorKeyConfig",
    "PaymentsConfig",
    "SettlementConfig",
    "default_staleness",
    "load_config",
    "parse_config",
    "resolve_operator_account",
]

EMBEDDED = "embedded"
"""``chain.endpoint`` value for the in-process EVM with contracts deployed at start-up."""

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
"""Accepted ``log_level`` values (case-insensitive in the file, stored upper-case)."""

_T = TypeVar("_T")
_URL_SCHEMES = ("http", "https", "ws", "wss")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PRIVATE_KEY = re.compile(r"(?<![0-9A-Za-z])(?:0[xX])?[0-9a-fA-F]{64}(?![0-9A-Za-z])")
_KEY_ADVICE = (
    "looks like a private key; never put keys in the config: name an environment "
    "variable (operator_key.env) or a keystore file (operator_key.keystore + password_env)"
)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the MQTT listener binds."""

    host: str = "127.0.0.1"
    """Interface address; ``0.0.0.0`` listens on all IPv4 interfaces."""
    port: int = 1883
    """TCP port, 0-65535 (0: let the OS pick one, for tests)."""


@dataclass(frozen=True, slots=True)
class ChainConfig:
    """Which chain the broker reads and settles on."""

    endpoint: str = EMBEDDED
    """``embedded`` (in-process EVM) or an ``http(s)://`` / ``ws(s)://`` JSON-RPC URL."""
    deployment: Path | None = None
    """Deployment JSON (contract addresses); required unless the endpoint is embedded."""
    confirmations: int = 2
    """Blocks to wait before trusting a transaction or event (>= 0; 0 only when written)."""
    poll_interval: float = 2.0
    """Seconds between polls for new blocks and events (> 0)."""
    max_staleness: float | None = None
    """Seconds the chain view may go without catching up with the node before every market
    decision fails closed (> poll_interval); None: max(10, 5 x poll_interval)."""

    @property
    def staleness_limit(self) -> float:
        """``max_staleness``, or its default for this ``poll_interval``."""
        if self.max_staleness is not None:
            return self.max_staleness
        return default_staleness(self.poll_interval)


def default_staleness(poll_interval: float) -> float:
    """Seconds without catching up before the chain view fails closed, when not configured:
    long enough for a few missed polls, never under 10 s (a slow node is not a dead one)."""
    return max(10.0, 5 * poll_interval)


@dataclass(frozen=True, slots=True)
class OperatorKeyConfig:
    """Where the broker operator's private key comes from: exactly one source."""

    env: str | None = None
    """Name of the environment variable holding the hex private key."""
    keystore: Path | None = None
    """Web3 Secret Storage (v3) keystore file, decrypted with ``$password_env``."""
    password_env: str | None = None
    """Name of the environment variable holding the keystore password."""


@dataclass(frozen=True, slots=True)
class SettlementConfig:
    """When the broker claims accepted vouchers on chain."""

    threshold: int = 0
    """Claim a channel once its unclaimed amount (token base units) reaches this (>= 0)."""
    interval_seconds: float = 3600.0
    """Seconds between settlement rounds (> 0)."""
    before_close_margin_seconds: float = 600.0
    """Claim a closing channel at least this long before its challenge period ends (>= 0)."""
    min_gas_balance_wei: int = 10**16
    """Warn when the operator's native balance falls below this many wei (>= 0)."""


@dataclass(frozen=True, slots=True)
class PaymentsConfig:
    """Metering and settlement of paid topics."""

    credit_messages: int = 5
    """Unpaid messages a subscriber may receive before delivery pauses (>= 1)."""
    dedup_max_pairs: int = 100_000
    """(device, topic) pairs whose recent sequences are kept to drop duplicate envelopes (>= 1);
    past it the least recently used is evicted, then looked up in the leaf store when needed."""
    settlement: SettlementConfig = field(default_factory=SettlementConfig)
    """When vouchers are claimed on chain."""


@dataclass(frozen=True, slots=True)
class AnchoringConfig:
    """When the leaves of market messages are anchored on chain (one transaction per batch)."""

    batch_seconds: float = 60.0
    """Anchor at most this long after the oldest pending leaf arrived (> 0)."""
    batch_max_leaves: int = 1000
    """Anchor as soon as this many leaves are pending (1 to 1048576)."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus metrics endpoint (``GET /metrics``); off unless a port is given."""

    host: str = "127.0.0.1"
    """Interface address of the metrics endpoint; keep it local unless a firewall guards it."""
    port: int | None = None
    """TCP port, 0-65535 (0: let the OS pick one, for tests); ``None``: no endpoint."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The read-only HTTP API and web dashboard (``GET /api/...``, ``GET /``); off unless a
    port is given."""

    host: str = "127.0.0.1"
    """Interface address of the HTTP API; keep it local unless a firewall or proxy guards it."""
    port: int | None = None
    """TCP port, 0-65535 (0: let the OS pick one, for tests); ``None``: no HTTP service."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The whole broker configuration (``blendsm broker -c broker.yaml``)."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    """MQTT listener."""
    chain: ChainConfig = field(default_factory=ChainConfig)
    """Chain endpoint and deployment."""
    operator_key: OperatorKeyConfig | None = None
    """Operator key reference; required unless the chain is embedded."""
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    """Metering credit and settlement policy."""
    anchoring: AnchoringConfig = field(default_factory=AnchoringConfig)
    """Batching of message leaves into on-chain anchors."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus endpoint (disabled by default)."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """HTTP API and dashboard (disabled by default)."""
    data_dir: Path = Path("blendsm-data")
    """Folder for the broker's durable state (voucher store, anchor leaves)."""
    public_topics: bool = False
    """Let anonymous clients use non-market topics like a plain MQTT broker."""
    log_level: str = "INFO"
    """One of CRITICAL, ERROR, WARNING, INFO, DEBUG."""


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def load_config(path: str | Path) -> BrokerConfig:
    """Read, parse and validate the YAML config at ``path``.

    Relative paths inside are resolved against the file's folder. Raises
    :class:`ConfigError` for an unreadable file, a YAML syntax error (with its line),
    an inline private key, or an invalid setting.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if _PRIVATE_KEY.search(line):
            raise ConfigError(f"{path}:{number}: {_KEY_ADVICE}")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    return parse_config({} if data is None else data, base_dir=path.parent)


def parse_config(data: Mapping[str, Any], *, base_dir: str | Path | None = None) -> BrokerConfig:
    """Validate an already-parsed mapping (e.g. from ``yaml.safe_load``) into a config.

    With ``base_dir``, relative paths are resolved against it; otherwise kept as given.
    """
    _refuse_inline_keys(data, "")
    root = _mapping(data, "config")
    base = None if base_dir is None else Path(base_dir)
    _check_keys(root, BrokerConfig, "")
    chain = _parse_chain(_section(root, "chain"), base)
    operator_key = _parse_operator_key(root.get("operator_key"), base)
    if operator_key is None and chain.endpoint != EMBEDDED:
        raise ConfigError(
            "operator_key: required when chain.endpoint is not embedded "
            "(give env: VAR or keystore: path + password_env: VAR)"
        )
    log_level = _typed(root, "log_level", "", str, _DEFAULTS.log_level).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    return BrokerConfig(
        listen=_parse_listen(_section(root, "listen")),
        chain=chain,
        operator_key=operator_key,
        payments=_parse_payments(_section(root, "payments")),
        anchoring=_parse_anchoring(_section(root, "anchoring")),
        metrics=_parse_metrics(_section(root, "metrics")),
        http=_parse_http(_section(root, "http")),
        data_dir=_path(root, "data_dir", "", base) or _resolve(_DEFAULTS.data_dir, base),
        public_topics=_typed(root, "public_topics", "", bool, _DEFAULTS.public_topics),
        log_level=log_level,
    )


def resolve_operator_account(config: BrokerConfig) -> LocalAccount | None:
    """The operator's account from its env var or keystore; ``None`` if none is configured.

    ``None`` happens only with the embedded chain, whose runner uses a pre-funded test
    account. Raises :class:`ConfigError` if the variable is unset or the key is invalid.
    """
    key = config.operator_key
    if key is None:
        return None
    if key.env is not None:
        return account_from_env(key.env)
    if key.keystore is None or key.password_env is None:
        raise ConfigError("operator_key: give env, or keystore with password_env")
    return account_from_keystore(key.keystore, key.password_env)


# --------------------------------------------------------------------------- sections

_DEFAULTS: Final = BrokerConfig()
"""Every default is declared once, on the dataclasses above; the parsers read it here."""


def _parse_listen(data: Mapping[str, Any]) -> ListenConfig:
    _check_keys(data, ListenConfig, "listen")
    host = _host(data, "listen", _DEFAULTS.listen.host)
    port = _int(data, "port", "listen", _DEFAULTS.listen.port, low=0, high=65535)
    return ListenConfig(host=host, port=port)


def _host(data: Mapping[str, Any], prefix: str, default: str) -> str:
    host = _typed(data, "host", prefix, str, default)
    if not host.strip():
        raise ConfigError(f"{prefix}.host: must not be empty")
    return host


def _optional_endpoint(
    data: Mapping[str, Any], prefix: str, default: str
) -> tuple[str, int | None]:
    """``(host, port)`` of an optional HTTP endpoint: no port means the endpoint is off."""
    host = _host(data, prefix, default)
    port = None if data.get("port") is None else _int(data, "port", prefix, 0, low=0, high=65535)
    return host, port


def _parse_chain(data: Mapping[str, Any], base: Path | None) -> ChainConfig:
    _check_keys(data, ChainConfig, "chain")
    endpoint = _typed(data, "endpoint", "chain", str, _DEFAULTS.chain.endpoint).strip()
    if endpoint != EMBEDDED:
        parts = urlsplit(endpoint)
        if parts.scheme.lower() not in _URL_SCHEMES or not parts.netloc:
            raise ConfigError(
                f"chain.endpoint: must be 'embedded' or an http(s):// or ws(s):// URL, "
                f"got {endpoint!r}"
            )
    deployment = _path(data, "deployment", "chain", base)
    if endpoint == EMBEDDED and deployment is not None:
        raise ConfigError(
            "chain.deployment: not used with the embedded chain (it deploys its own "
            "contracts at start-up); remove it or set chain.endpoint to a node URL"
        )
    if endpoint != EMBEDDED and deployment is None:
        raise ConfigError("chain.deployment: required when chain.endpoint is not embedded")
    poll_interval = _seconds(
        data, "poll_interval", "chain", _DEFAULTS.chain.poll_interval, allow_zero=False
    )
    max_staleness: float | None = None
    if data.get("max_staleness") is not None:
        max_staleness = _seconds(data, "max_staleness", "chain", 0.0, allow_zero=False)
    if max_staleness is not None and max_staleness <= poll_interval:
        raise ConfigError(
            f"chain.max_staleness: must exceed chain.poll_interval ({poll_interval:g} s),"
            f" got {max_staleness:g}"
        )
    return ChainConfig(
        endpoint=endpoint,
        deployment=deployment,
        confirmations=_int(data, "confirmations", "chain", _DEFAULTS.chain.confirmations, low=0),
        poll_interval=poll_interval,
        max_staleness=max_staleness,
    )


def _parse_operator_key(value: Any, base: Path | None) -> OperatorKeyConfig | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(
            "operator_key: must be a mapping (env: VAR_NAME, or keystore: path + "
            "password_env: VAR_NAME); keys go in environment variables or keystores"
        )
    data = _mapping(value, "operator_key")
    _check_keys(data, OperatorKeyConfig, "operator_key")
    env = _env_name(data, "env")
    keystore = _path(data, "keystore", "operator_key", base)
    password_env = _env_name(data, "password_env")
    if (env is None) == (keystore is None):
        raise ConfigError(
            "operator_key: give exactly one of env (variable holding the hex key) "
            "or keystore (with password_env)"
        )
    if keystore is not None and password_env is None:
        raise ConfigError("operator_key.password_env: required with operator_key.keystore")
    if env is not None and password_env is not None:
        raise ConfigError("operator_key.password_env: only used with operator_key.keystore")
    return OperatorKeyConfig(env=env, keystore=keystore, password_env=password_env)


def _parse_anchoring(data: Mapping[str, Any]) -> AnchoringConfig:
    _check_keys(data, AnchoringConfig, "anchoring")
    default = _DEFAULTS.anchoring
    return AnchoringConfig(
        batch_seconds=_seconds(
            data, "batch_seconds", "anchoring", default.batch_seconds, allow_zero=False
        ),
        batch_max_leaves=_int(
            data, "batch_max_leaves", "anchoring", default.batch_max_leaves, low=1, high=2**20
        ),
    )


def _parse_metrics(data: Mapping[str, Any]) -> MetricsConfig:
    _check_keys(data, MetricsConfig, "metrics")
    host, port = _optional_endpoint(data, "metrics", _DEFAULTS.metrics.host)
    return MetricsConfig(host=host, port=port)


def _parse_http(data: Mapping[str, Any]) -> HttpConfig:
    _check_keys(data, HttpConfig, "http")
    host, port = _optional_endpoint(data, "http", _DEFAULTS.http.host)
    return HttpConfig(host=host, port=port)


def _parse_payments(data: Mapping[str, Any]) -> PaymentsConfig:
    _check_keys(data, PaymentsConfig, "payments")
    settlement = _section(data, "settlement", "payments")
    _check_keys(settlement, SettlementConfig, "payments.settlement")
    where = "payments.settlement"
    default, settle = _DEFAULTS.payments, _DEFAULTS.payments.settlement
    return PaymentsConfig(
        credit_messages=_int(data, "credit_messages", "payments", default.credit_messages, low=1),
        dedup_max_pairs=_int(data, "dedup_max_pairs", "payments", default.dedup_max_pairs, low=1),
        settlement=SettlementConfig(
            threshold=_amount(settlement, "threshold", where, settle.threshold),
            interval_seconds=_seconds(
                settlement, "interval_seconds", where, settle.interval_seconds, allow_zero=False
            ),
            before_close_margin_seconds=_seconds(
                settlement,
                "before_close_margin_seconds",
                where,
                settle.before_close_margin_seconds,
                allow_zero=True,
            ),
            min_gas_balance_wei=_amount(
                settlement, "min_gas_balance_wei", where, settle.min_gas_balance_wei
            ),
        ),
    )


# --------------------------------------------------------------------------- fields


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _refuse_inline_keys(value: Any, where: str) -> None:
    """Refuse any string (key or value) that looks like a private key, anywhere."""
    if isinstance(value, str):
        if _PRIVATE_KEY.search(value):
            raise ConfigError(f"{where or 'config'}: {_KEY_ADVICE}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = _dotted(where, str(key))
            if isinstance(key, str) and _PRIVATE_KEY.search(key):
                raise ConfigError(f"{where or 'config'}: a key name {_KEY_ADVICE}")
            _refuse_inline_keys(item, name)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_inline_keys(item, f"{where}[{index}]")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
    return value


def _section(data: Mapping[str, Any], name: str, prefix: str = "") -> Mapping[str, Any]:
    """A nested mapping; missing or empty (``name:`` with nothing under it) means defaults."""
    value = data.get(name)
    return {} if value is None else _mapping(value, _dotted(prefix, name))


def _check_keys(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{_dotted(prefix, key)}: unknown key{hint}")


def _typed(data: Mapping[str, Any], name: str, prefix: str, kind: type[_T], default: _T) -> _T:
    if name not in data:
        return default
    value = data[name]
    # bool is an int subclass: never accept one for the other.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{_dotted(prefix, name)}: must be {kind.__name__}, got {_type_name(value)} {value!r}"
        )
    return value


def _int(
    data: Mapping[str, Any],
    name: str,
    prefix: str,
    default: int,
    *,
    low: int,
    high: int | None = None,
) -> int:
    value = _typed(data, name, prefix, int, default)
    if value < low:
        raise ConfigError(f"{_dotted(prefix, name)}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{_dotted(prefix, name)}: must be <= {high}, got {value}")
    return value


def _seconds(
    data: Mapping[str, Any], name: str, prefix: str, default: float, *, allow_zero: bool
) -> float:
    where = _dotted(prefix, name)
    if name not in data:
        return default
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{where}: must be a number of seconds, got {_type_name(value)} {value!r}"
        )
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: must be finite, got {value}")
    if allow_zero and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if not allow_zero and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")
    return float(value)


def _amount(data: Mapping[str, Any], name: str, prefix: str, default: int) -> int:
    """A uint256 amount: an int or a decimal string of digits; floats refused (precision)."""
    where = _dotted(prefix, name)
    if name not in data:
        return default
    value = data[name]
    if isinstance(value, float | Decimal):
        raise ConfigError(
            f"{where}: floats lose precision; write the amount in base units as an integer "
            f"or a quoted decimal string (e.g. '1000000000000000000'), got {value!r}"
        )
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if not text.isascii() or not text.isdigit():
            raise ConfigError(
                f"{where}: must be a whole number of base units (digits only), got {value!r}"
            )
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{where}: must be an integer or a decimal string, got {_type_name(value)} {value!r}"
        )
    if value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if value > UINT256_MAX:
        raise ConfigError(f"{where}: must fit in uint256 (<= 2**256 - 1), got {value}")
    return value


def _path(data: Mapping[str, Any], name: str, prefix: str, base: Path | None) -> Path | None:
    where = _dotted(prefix, name)
    if data.get(name) is None:
        return None
    value = data[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty path, got {_type_name(value)} {value!r}")
    return _resolve(Path(value).expanduser(), base)


def _resolve(path: Path, base: Path | None) -> Path:
    return path if base is None or path.is_absolute() else base / path


def _env_name(data: Mapping[str, Any], name: str) -> str | None:
    where = _dotted("operator_key", name)
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: must be an environment variable name (letters, digits, _), "
            f"got {_type_name(value)}; the key itself goes in that variable"
        )
    return value
