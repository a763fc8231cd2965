"""Run a BlendSM broker: chain connection, marketplace service and ``BlendBroker`` together.

``start_broker(config)`` is what ``blendsm broker -c broker.yaml`` runs, and what tests and the
demo use. With ``chain.endpoint: embedded`` it starts an in-process EVM, deploys the suite and
uses TEST-ONLY accounts (the embedded chain holds no value); with a node URL it loads the
deployment file and the operator key from its environment variable or keystore.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from blendsm.broker._blend_broker import BlendBroker
from blendsm.broker._chain_view import ChainView
from blendsm.broker._config import EMBEDDED, BrokerConfig, resolve_operator_account
from blendsm.broker._config_listeners import ListenerConfig
from blendsm.broker._gc_tuning import tune_collector
from blendsm.broker._listeners import bound_port
from blendsm.broker._metrics import MetricsServer
from blendsm.broker._service import MarketplaceService
from blendsm.broker._shutdown import wait_bounded
from blendsm.contracts import Deployment
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from blendsm.broker._http import HttpServer

__all__ = [
    "ChainConnection",
    "RunningBroker",
    "amqtt_config",
    "connect_chain",
    "served_listeners",
    "start_broker",
]

_log = logging.getLogger("blendsm.broker")

PLUGIN_PATH = "blendsm.plugins.MarketplacePlugin"
_FLOOR_SECONDS = 1.0
"""Every step of a stop gets at least this long, even past the deadline."""
_SERVERS_SECONDS = 3.0
"""The HTTP API and metrics close their open requests (aiohttp waits up to 1 s for them)."""


@dataclass
class ChainConnection:
    """The chain a broker talks to; ``tester`` is the in-process EVM when embedded."""

    w3: AsyncWeb3[Any]
    deployment: Deployment
    operator: LocalAccount
    tester: Any = None
    owned: bool = True

    async def close(self) -> None:
        from blendsm.contracts import disconnect

        if self.owned:
            await disconnect(self.w3)


async def connect_chain(config: BrokerConfig) -> ChainConnection:
    """Connect to the configured chain (deploying the suite when embedded)."""
    from blendsm.contracts import (
        connect,
        deploy_suite,
        enrol_operator,
        new_embedded_chain,
        test_account,
    )

    if config.chain.endpoint == EMBEDDED:
        operator = resolve_operator_account(config) or test_account("operator")  # TEST ONLY
        deployer = test_account("deployer")  # TEST ONLY: the embedded chain holds no value
        tester = new_embedded_chain(fund=[operator.address, deployer.address])
        w3 = connect(EMBEDDED, ethereum_tester=tester)
        deployment = await deploy_suite(w3, deployer)
        await enrol_operator(w3, deployment, operator, deployer)
        # The in-process chain mines only on transactions: without these blocks the view
        # (``chain.confirmations`` deep) would not see the operator enrolled, and a broker
        # whose operator is not active serves no market topic, until two more transactions.
        tester.mine_blocks(config.chain.confirmations)
        return ChainConnection(w3, deployment, operator, tester)
    account = resolve_operator_account(config)
    if account is None or config.chain.deployment is None:
        raise ConfigError("operator_key and chain.deployment are required for a node endpoint")
    try:
        deployment = Deployment.load(config.chain.deployment)
    except OSError as exc:
        raise ConfigError(
            f"chain.deployment: cannot read {config.chain.deployment}: {exc}"
        ) from exc
    w3 = connect(config.chain.endpoint)
    return ChainConnection(w3, deployment, account)


def served_listeners(config: BrokerConfig) -> tuple[ListenerConfig, ...]:
    """The MQTT listeners a broker with ``config`` opens: ``listeners``, or else ``listen`` as
    the plain TCP listener ``default``. The first one is ``RunningBroker.port``."""
    if config.listeners:
        return config.listeners
    return (ListenerConfig("default", "tcp", config.listen.host, config.listen.port),)


def amqtt_config(
    config: BrokerConfig, plugin_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The amqtt broker config dict: our listeners (type and address; their TLS is ours, see
    :mod:`._listeners`) and our plugin, nothing else (each default plugin costs asyncio Tasks
    per packet). amqtt requires a listener named ``default`` (an unbound one stands in when
    none of ours has that name) and copies its settings into the others where they equal
    amqtt's defaults, so ``BlendBroker(..., listeners=served_listeners(config))`` installs them
    exactly as configured."""
    listeners: dict[str, dict[str, Any]] = {"default": {"bind": None}}
    for spec in served_listeners(config):
        listeners[spec.name] = {"type": spec.type, "bind": f"{spec.host}:{spec.port}"}
    return {"listeners": listeners, "plugins": {PLUGIN_PATH: plugin_options or {}}}


@dataclass
class RunningBroker:
    """A started broker; ``await stop()`` shuts it down and closes what it opened."""

    broker: BlendBroker
    service: MarketplaceService
    chain: ChainConnection
    host: str
    port: int
    """Port of the first listener (``listen``, or the first of ``listeners``)."""
    ports: dict[str, int] = field(default_factory=dict)
    """Bound port of every MQTT listener by name (``default`` for ``listen``): the OS's pick
    where the config says 0."""
    metrics: MetricsServer | None = None
    """The Prometheus endpoint, when ``metrics.port`` is set (``metrics.port`` is its port)."""
    http: HttpServer | None = None
    """The HTTP API and dashboard, when ``http.port`` is set (``http.port`` is its port)."""

    async def stop(self) -> None:
        """Stop within about ``limits.shutdown_seconds``, whatever the clients or the chain
        do: the HTTP API and metrics, then the broker (connections closed, the stragglers
        aborted), then the service's chain work gets what is left of the time (cancelled
        work resumes from its write-ahead records at the next start), then the stores and
        the chain connection are closed. Accepted vouchers are already durable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.service.config.limits.shutdown_seconds
        servers = [s.stop() for s in (self.http, self.metrics) if s is not None]
        await wait_bounded(servers, _SERVERS_SECONDS, "HTTP and metrics stop")
        try:
            await self.broker.shutdown(within=max(_FLOOR_SECONDS, deadline - loop.time()))
        finally:
            await self.service.stop(within=max(_FLOOR_SECONDS, deadline - loop.time()))
            await wait_bounded([self.chain.close()], _FLOOR_SECONDS, "chain connection close")


async def start_broker(
    config: BrokerConfig,
    *,
    chain: ChainConnection | None = None,
    sync_timeout: float = 30.0,
    view: ChainView | None = None,
    settler_options: dict[str, Any] | None = None,
) -> RunningBroker:
    """Start the marketplace service and the broker; returns once it accepts connections.

    ``view`` and ``settler_options`` override the chain view and settlement tuning (tests)."""
    tune_collector()
    if chain is None:
        chain = await connect_chain(config)
    service = MarketplaceService(
        config=config,
        w3=chain.w3,
        deployment=chain.deployment,
        operator=chain.operator,
        view=view,
        settler_options=settler_options,
    )
    await service.start(sync_timeout=sync_timeout)
    listeners = served_listeners(config)
    try:
        broker = await _start_amqtt(config, service)
    except BaseException:
        await service.stop()
        raise
    ports: dict[str, int] = {}
    for spec in listeners:
        server = broker._servers.get(spec.name)
        port = bound_port(server.instance) if server is not None else None
        ports[spec.name] = spec.port if port is None else port
        _log.info(
            "BlendSM broker listening on %s://%s:%d (%s)",
            spec.scheme,
            spec.host,
            ports[spec.name],
            spec.name,
        )
    first = listeners[0]
    running = RunningBroker(broker, service, chain, first.host, ports[first.name], ports)
    if config.metrics.port is not None:
        metrics = MetricsServer(
            service, config.metrics.host, config.metrics.port, tls=config.metrics.tls
        )
        try:
            await metrics.start()
        except BaseException as exc:
            await running.stop()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"metrics: cannot listen on {config.metrics.host}:{config.metrics.port}: {exc}"
                ) from exc
            raise
        running.metrics = metrics
    if config.http.port is not None:
        from blendsm.broker._http import HttpServer  # aiohttp.web only when the API is on

        http = HttpServer(service, config.http.host, config.http.port, tls=config.http.tls)
        try:
            await http.start()
        except BaseException as exc:
            try:
                await http.stop()
            finally:
                await running.stop()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"http: cannot listen on {config.http.host}:{config.http.port}: {exc}"
                ) from exc
            raise
        running.http = http
    return running


async def _start_amqtt(config: BrokerConfig, service: MarketplaceService) -> BlendBroker:
    """Start amqtt with our listeners. amqtt opens them one by one and leaves the ones already
    open when a later one fails: close those, and name the listener that could not bind."""
    broker = BlendBroker(amqtt_config(config), service=service, listeners=served_listeners(config))
    try:
        await broker.start()
    except BaseException as exc:
        for server in list(broker._servers.values()):
            await server.close_instance()
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from exc
        if isinstance(cause, OSError):
            failed = [s for s in served_listeners(config) if s.name not in broker._servers]
            where = f"listeners.{failed[0].name}" if config.listeners and failed else "listen"
            address = f"{failed[0].host}:{failed[0].port}" if failed else "?"
            raise ConfigError(f"{where}: cannot listen on {address}: {cause}") from exc
        raise
    return broker
