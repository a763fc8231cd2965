"""``blendsm broker``: run the MQTT broker with the marketplace plugins from a YAML config
until SIGINT or SIGTERM (then stop it cleanly: settle, anchor, close the stores). The config's
``listeners`` (TCP, TLS, WebSocket) and ``http.tls``/``metrics.tls`` are served as written;
the first line printed names the first listener, one line follows per listener."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``blendsm broker``."""
    broker = sub.add_parser(
        "broker", help="run the MQTT broker with the marketplace plugins (until SIGINT/SIGTERM)"
    )
    broker.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="broker YAML (see docs)"
    )
    broker.add_argument(
        "--port", type=int, metavar="N", help="override listen.port (not with listeners:)"
    )
    broker.set_defaults(func=_cmd_broker)


def _cmd_broker(args: argparse.Namespace) -> int:
    from blendsm.broker import load_config, served_listeners, start_broker
    from blendsm.errors import ConfigError

    config = load_config(args.config)
    if args.port is not None and config.listeners:
        raise ConfigError(
            "--port: overrides listen.port only; the config names listeners: set their ports there"
        )
    if args.port is not None:
        config = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, port=args.port)
        )
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("amqtt").setLevel(
        max(logging.WARNING, logging.getLevelName(config.log_level))
    )

    async def serve() -> None:
        running = await start_broker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"blendsm broker listening on {running.host}:{running.port}"
            f" (operator {running.chain.operator.address}, chain id"
            f" {running.chain.deployment.chain_id})",
            flush=True,
        )
        for spec in served_listeners(config):
            print(
                f"  {spec.name}: {spec.scheme}://{spec.host}:{running.ports[spec.name]}",
                flush=True,
            )
        try:
            await stop.wait()
        finally:
            print("blendsm broker stopping", flush=True)
            await running.stop()

    asyncio.run(serve())
    return 0
