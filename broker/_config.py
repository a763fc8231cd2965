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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import yaml  # type: ignore[import-untyped]
from eth_account.signers.local import LocalAccount

from blendsm.broker._config_fields import (
    KEY_ADVICE,
    PRIVATE_KEY,
    amount,
    check_keys,
    integer,
    key_account,
    mapping,
    path_field,
    refuse_inline_keys,
    resolve,
    seconds,
    section,
    typed,
)
from blendsm.broker._config_keys import OperatorKeyConfig, parse_key_config
from blendsm.broker._config_listeners import ListenerConfig, TlsConfig, parse_listeners, parse_tls
from blendsm.broker._config_sessions import SessionsConfig, parse_sessions
from blendsm.broker._intake_config import IntakeConfig, parse_intake
from blendsm.broker._replay import ReplayConfig, parse_replay
from blendsm.errors import ConfigError

__all__ = [
    "EMBEDDED",
    "LOG_LEVELS",
    "AnchoringConfig",
    "BrokerConfig",
    "ChainConfig",
    "HttpConfig",
    "LimitsConfig",
    "ListenConfig",
    "ListenerConfig",
    "MetricsConfig",
    "OperatorKeyConfig",
    "PaymentsConfig",
    "SettlementConfig",
    "TlsConfig",
    "default_staleness",
    "load_config",
    "parse_config",
    "resolve_broker_account",
    "resolve_operator_account",
]

EMBEDDED = "embedded"
"""``chain.endpoint`` value for the in-process EVM with contracts deployed at start-up."""

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
"""Accepted ``log_level`` values (case-insensitive in the file, stored upper-case)."""

_T = TypeVar("_T")
_URL_SCHEMES = ("http", "https", "ws", "wss")


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
    hold_messages: int = 10_000
    """Live paid deliveries one session may have held while waiting for a voucher (0-10000;
    0: none, a delivery refused for credit is dropped); past it the oldest is dropped. The
    default is the session's outgoing message bound (``sessions.max_outgoing_messages``), so
    in practice the bytes bound (``sessions.max_outgoing_bytes``, 1 MiB) decides: held bytes
    count against it like deliveries in flight, whatever this says. With 1,000 (before
    2026-12-04) the benchmarks' bursts (3,000 and 5,000 messages to 10 subscribers) lost
    12,000-27,500 deliveries from the hold; with 6,000 or more, none."""
    hold_seconds: float = 5.0
    """Seconds a delivery may wait for credit before it is dropped (> 0, at most 60)."""
    dedup_max_pairs: int = 100_000
    """(device, topic) pairs whose recent sequences are kept to drop duplicate envelopes (>= 1);
    past it the least recently used is evicted, then looked up in the leaf store when needed."""
    settlement: SettlementConfig = field(default_factory=SettlementConfig)
    """When vouchers are claimed on chain."""
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    """Voucher intake: receipt batching, queued vouchers per session."""


@dataclass(frozen=True, slots=True)
class AnchoringConfig:
    """When the leaves of market messages are anchored on chain (one transaction per batch)."""

    batch_seconds: float = 60.0
    """Anchor at most this long after the oldest pending leaf arrived (> 0)."""
    batch_max_leaves: int = 1000
    """Anchor as soon as this many leaves of sold topics are pending (1 to 1048576), paced by
    ``max_roots_per_hour``."""
    max_leaves_per_root: int = 100_000
    """The most leaves one root covers (1 to 1048576; the transaction costs the same gas
    whatever the count, sealing about 6 us per leaf): with the pacing, the most messages a
    broker anchors is this times ``max_roots_per_hour`` an hour (10,000/s by default)."""
    max_roots_per_hour: int = 360
    """Anchor transactions in any hour (1 to 3600): the operator's gas ceiling (about 89k gas
    each). Background roots are paced ``3600 / max_roots_per_hour`` seconds apart at least,
    so the budget lasts the hour; past the ceiling sealing waits and leaves accumulate."""
    unsold_batch_seconds: float = 3600.0
    """Leaves of topics with no delivery since they arrived ("unsold") trigger a root alone
    only once the oldest is this old; they ride free in roots sold leaves trigger. 0: treat
    them like sold leaves (every leaf triggers by time and count)."""
    max_pending_leaves_per_seller: int = 100_000
    """Unanchored leaves one seller's devices may have waiting (>= 1); past it the seller's
    envelopes are refused (QoS 0 dropped, QoS 1/2 unacknowledged and disconnected)."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on what a client controls, beyond the payment credit."""

    connect_timeout_seconds: float = 10.0
    """Seconds a new connection may take to send a complete CONNECT before it is closed
    (> 0; at most 3600): idle sockets would otherwise hold file descriptors forever."""
    max_connections: int = 10_000
    """Client connections open at once (>= 1); lowered at start to what the descriptor limit
    leaves after a reserve for the broker's own chain client and stores."""
    max_connections_per_ip: int = 1_000
    """Client connections open at once from one remote address (>= 1; a gateway or NAT may
    hold many devices)."""
    connect_rate_per_ip: float = 50.0
    """New connections per second one address may open, on average (> 0)..."""
    connect_burst_per_ip: int = 1_000
    """... and at once (>= 1): a whole NAT'd fleet reconnecting after a restart fits."""
    max_packet_bytes: int = 1_048_576
    """Largest MQTT packet a client may send, fixed header included (512 to 268435460); a
    larger one closes the connection once its header is read, its body never buffered."""
    shutdown_seconds: float = 10.0
    """A stop closes connections and background chain work within about this long (> 0, at
    most 600), aborting what is left; the stores are closed after."""
    max_filters_per_session: int = 100
    """Subscription filters one session holds (>= 1); a SUBSCRIBE past it gets 0x80."""
    max_filters_per_identity: int = 1_000
    """Subscription filters all sessions of one member address hold together (>= 1)."""
    max_incoming_inflight: int = 1_000
    """QoS 2 messages one session may leave awaiting their PUBREL (>= 1); one more closes it."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus metrics endpoint (``GET /metrics``); off unless a port is given."""

    host: str = "127.0.0.1"
    """Interface address of the metrics endpoint; keep it local unless a firewall guards it."""
    port: int | None = None
    """TCP port, 0-65535 (0: let the OS pick one, for tests); ``None``: no endpoint."""
    tls: TlsConfig | None = None
    """Serve it over HTTPS (certfile, keyfile; optionally client certificates)."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The read-only HTTP API and web dashboard (``GET /api/...``, ``GET /``); off unless a
    port is given."""

    host: str = "127.0.0.1"
    """Interface address of the HTTP API; keep it local unless a firewall or proxy guards it."""
    port: int | None = None
    """TCP port, 0-65535 (0: let the OS pick one, for tests); ``None``: no HTTP service."""
    tls: TlsConfig | None = None
    """Serve it over HTTPS (certfile, keyfile; optionally client certificates)."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The whole broker configuration (``blendsm broker -c broker.yaml``)."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    """The plain MQTT listener, named ``default``, when ``listeners`` is empty."""
    listeners: tuple[ListenerConfig, ...] = ()
    """Named MQTT listeners (TCP, TLS, WebSocket); when given, they replace ``listen``."""
    chain: ChainConfig = field(default_factory=ChainConfig)
    """Chain endpoint and deployment."""
    operator_key: OperatorKeyConfig | None = None
    """Operator key reference; required unless the chain is embedded."""
    broker_key: OperatorKeyConfig | None = None
    """This broker's own key, its lane of every channel (registered in Brokers to the
    operator); ``None``: the operator key, lane = the operator address (one broker)."""
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    """Metering credit and settlement policy."""
    anchoring: AnchoringConfig = field(default_factory=AnchoringConfig)
    """Batching of message leaves into on-chain anchors."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Bounds on what clients control (CONNECT time)."""
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    """Persistent sessions: expiry, cap per identity, queue and in-flight bounds."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Recent envelopes kept per market topic for subscribers that resume here."""
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
        if PRIVATE_KEY.search(line):
            raise ConfigError(f"{path}:{number}: {KEY_ADVICE}")
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
    refuse_inline_keys(data, "")
    root = mapping(data, "config")
    base = None if base_dir is None else Path(base_dir)
    check_keys(root, BrokerConfig, "")
    chain = _parse_chain(section(root, "chain"), base)
    operator_key = parse_key_config(root.get("operator_key"), base)
    if operator_key is None and chain.endpoint != EMBEDDED:
        raise ConfigError(
            "operator_key: required when chain.endpoint is not embedded "
            "(give env: VAR or keystore: path + password_env: VAR)"
        )
    log_level = typed(root, "log_level", "", str, _DEFAULTS.log_level).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    return BrokerConfig(
        listen=_parse_listen(section(root, "listen")),
        listeners=parse_listeners(root, base),
        chain=chain,
        operator_key=operator_key,
        broker_key=parse_key_config(root.get("broker_key"), base, "broker_key"),
        payments=_parse_payments(section(root, "payments")),
        anchoring=_parse_anchoring(section(root, "anchoring")),
        limits=_parse_limits(section(root, "limits")),
        sessions=parse_sessions(section(root, "sessions")),
        replay=parse_replay(section(root, "replay")),
        metrics=_parse_metrics(section(root, "metrics"), base),
        http=_parse_http(section(root, "http"), base),
        data_dir=path_field(root, "data_dir", "", base) or resolve(_DEFAULTS.data_dir, base),
        public_topics=typed(root, "public_topics", "", bool, _DEFAULTS.public_topics),
        log_level=log_level,
    )


def resolve_operator_account(config: BrokerConfig) -> LocalAccount | None:
    """The operator's account from its env var or keystore; ``None`` if none is configured.

    ``None`` happens only with the embedded chain, whose runner uses a pre-funded test
    account. Raises :class:`ConfigError` if the variable is unset or the key is invalid.
    """
    return key_account(config.operator_key, "operator_key")


def resolve_broker_account(config: BrokerConfig) -> LocalAccount | None:
    """This broker's own key (its lane), ``None`` when it uses the operator key."""
    return key_account(config.broker_key, "broker_key")


# --------------------------------------------------------------------------- sections

_DEFAULTS: Final = BrokerConfig()
"""Every default is declared once, on the dataclasses above; the parsers read it here."""


def _parse_listen(data: Mapping[str, Any]) -> ListenConfig:
    check_keys(data, ListenConfig, "listen")
    host = _host(data, "listen", _DEFAULTS.listen.host)
    port = integer(data, "port", "listen", _DEFAULTS.listen.port, low=0, high=65535)
    return ListenConfig(host=host, port=port)


def _host(data: Mapping[str, Any], prefix: str, default: str) -> str:
    host = typed(data, "host", prefix, str, default)
    if not host.strip():
        raise ConfigError(f"{prefix}.host: must not be empty")
    return host


def _optional_endpoint(
    data: Mapping[str, Any], prefix: str, default: str
) -> tuple[str, int | None]:
    """``(host, port)`` of an optional HTTP endpoint: no port means the endpoint is off."""
    host = _host(data, prefix, default)
    port = None if data.get("port") is None else integer(data, "port", prefix, 0, low=0, high=65535)
    return host, port


def _parse_chain(data: Mapping[str, Any], base: Path | None) -> ChainConfig:
    check_keys(data, ChainConfig, "chain")
    endpoint = typed(data, "endpoint", "chain", str, _DEFAULTS.chain.endpoint).strip()
    if endpoint != EMBEDDED:
        parts = urlsplit(endpoint)
        if parts.scheme.lower() not in _URL_SCHEMES or not parts.netloc:
            raise ConfigError(
                f"chain.endpoint: must be 'embedded' or an http(s):// or ws(s):// URL, "
                f"got {endpoint!r}"
            )
    deployment = path_field(data, "deployment", "chain", base)
    if endpoint == EMBEDDED and deployment is not None:
        raise ConfigError(
            "chain.deployment: not used with the embedded chain (it deploys its own "
            "contracts at start-up); remove it or set chain.endpoint to a node URL"
        )
    if endpoint != EMBEDDED and deployment is None:
        raise ConfigError("chain.deployment: required when chain.endpoint is not embedded")
    poll_interval = seconds(
        data, "poll_interval", "chain", _DEFAULTS.chain.poll_interval, allow_zero=False
    )
    max_staleness: float | None = None
    if data.get("max_staleness") is not None:
        max_staleness = seconds(data, "max_staleness", "chain", 0.0, allow_zero=False)
    if max_staleness is not None and max_staleness <= poll_interval:
        raise ConfigError(
            f"chain.max_staleness: must exceed chain.poll_interval ({poll_interval:g} s),"
            f" got {max_staleness:g}"
        )
    return ChainConfig(
        endpoint=endpoint,
        deployment=deployment,
        confirmations=integer(data, "confirmations", "chain", _DEFAULTS.chain.confirmations, low=0),
        poll_interval=poll_interval,
        max_staleness=max_staleness,
    )


def _parse_anchoring(data: Mapping[str, Any]) -> AnchoringConfig:
    check_keys(data, AnchoringConfig, "anchoring")
    default = _DEFAULTS.anchoring
    return AnchoringConfig(
        batch_seconds=seconds(
            data, "batch_seconds", "anchoring", default.batch_seconds, allow_zero=False
        ),
        batch_max_leaves=integer(
            data, "batch_max_leaves", "anchoring", default.batch_max_leaves, low=1, high=2**20
        ),
        max_leaves_per_root=integer(
            data, "max_leaves_per_root", "anchoring", default.max_leaves_per_root, low=1, high=2**20
        ),
        max_roots_per_hour=integer(
            data, "max_roots_per_hour", "anchoring", default.max_roots_per_hour, low=1, high=3600
        ),
        unsold_batch_seconds=seconds(
            data, "unsold_batch_seconds", "anchoring", default.unsold_batch_seconds, allow_zero=True
        ),
        max_pending_leaves_per_seller=integer(
            data,
            "max_pending_leaves_per_seller",
            "anchoring",
            default.max_pending_leaves_per_seller,
            low=1,
        ),
    )


def _parse_limits(data: Mapping[str, Any]) -> LimitsConfig:
    check_keys(data, LimitsConfig, "limits")
    default = _DEFAULTS.limits
    name = "connect_timeout_seconds"
    timeout = seconds(data, name, "limits", default.connect_timeout_seconds, allow_zero=False)
    if timeout > 3600:
        raise ConfigError(f"limits.{name}: must be <= 3600, got {timeout}")
    total = integer(data, "max_connections", "limits", default.max_connections, low=1, high=10**6)
    per_ip = integer(
        data, "max_connections_per_ip", "limits", default.max_connections_per_ip, low=1, high=10**6
    )
    rate_name, rate_unit = "connect_rate_per_ip", "a number per second"
    rate = seconds(
        data, rate_name, "limits", default.connect_rate_per_ip, allow_zero=False, unit=rate_unit
    )
    burst = integer(data, "connect_burst_per_ip", "limits", default.connect_burst_per_ip, low=1)
    packet = integer(
        data, "max_packet_bytes", "limits", default.max_packet_bytes, low=512, high=268_435_460
    )
    stop = seconds(data, "shutdown_seconds", "limits", default.shutdown_seconds, allow_zero=False)
    if stop > 600:
        raise ConfigError(f"limits.shutdown_seconds: must be <= 600, got {stop}")
    return LimitsConfig(
        connect_timeout_seconds=timeout,
        max_connections=total,
        max_connections_per_ip=per_ip,
        connect_rate_per_ip=rate,
        connect_burst_per_ip=burst,
        max_packet_bytes=packet,
        shutdown_seconds=stop,
        max_filters_per_session=_int_limit(data, "max_filters_per_session"),
        max_filters_per_identity=_int_limit(data, "max_filters_per_identity"),
        max_incoming_inflight=_int_limit(data, "max_incoming_inflight"),
    )


def _int_limit(data: Mapping[str, Any], name: str) -> int:
    """A count limit in ``limits``: 1-1,000,000, default from LimitsConfig."""
    return integer(data, name, "limits", getattr(_DEFAULTS.limits, name), low=1, high=10**6)


def _parse_metrics(data: Mapping[str, Any], base: Path | None) -> MetricsConfig:
    check_keys(data, MetricsConfig, "metrics")
    host, port = _optional_endpoint(data, "metrics", _DEFAULTS.metrics.host)
    return MetricsConfig(host=host, port=port, tls=parse_tls(data.get("tls"), "metrics.tls", base))


def _parse_http(data: Mapping[str, Any], base: Path | None) -> HttpConfig:
    check_keys(data, HttpConfig, "http")
    host, port = _optional_endpoint(data, "http", _DEFAULTS.http.host)
    return HttpConfig(host=host, port=port, tls=parse_tls(data.get("tls"), "http.tls", base))


def _hold_seconds(data: Mapping[str, Any]) -> float:
    held = seconds(
        data, "hold_seconds", "payments", _DEFAULTS.payments.hold_seconds, allow_zero=False
    )
    if held > 60:
        raise ConfigError(f"payments.hold_seconds: must be <= 60, got {held}")
    return held


def _parse_payments(data: Mapping[str, Any]) -> PaymentsConfig:
    check_keys(data, PaymentsConfig, "payments")
    settlement = section(data, "settlement", "payments")
    check_keys(settlement, SettlementConfig, "payments.settlement")
    where = "payments.settlement"
    default, settle = _DEFAULTS.payments, _DEFAULTS.payments.settlement
    return PaymentsConfig(
        credit_messages=integer(
            data, "credit_messages", "payments", default.credit_messages, low=1
        ),
        hold_messages=integer(
            data, "hold_messages", "payments", default.hold_messages, low=0, high=10_000
        ),
        hold_seconds=_hold_seconds(data),
        dedup_max_pairs=integer(
            data, "dedup_max_pairs", "payments", default.dedup_max_pairs, low=1
        ),
        intake=parse_intake(section(data, "intake", "payments")),
        settlement=SettlementConfig(
            threshold=amount(settlement, "threshold", where, settle.threshold),
            interval_seconds=seconds(
                settlement, "interval_seconds", where, settle.interval_seconds, allow_zero=False
            ),
            before_close_margin_seconds=seconds(
                settlement,
                "before_close_margin_seconds",
                where,
                settle.before_close_margin_seconds,
                allow_zero=True,
            ),
            min_gas_balance_wei=amount(
                settlement, "min_gas_balance_wei", where, settle.min_gas_balance_wei
            ),
        ),
    )
