"""``MarketplacePlugin``: BlendSM's identity, access control and metering as an amqtt plugin.

Two ways to run it:

* ``blendsm broker -c broker.yaml`` builds a :class:`~blendsm.broker.BlendBroker`
  with the service already attached; the plugin then only answers amqtt's auth and topic calls.
* In a plain amqtt YAML (``plugins: {blendsm.plugins.MarketplacePlugin: {config: broker.yaml}}``)
  the plugin loads the BlendSM config, upgrades the Broker instance to ``BlendBroker`` (a class
  swap: same object, our overrides of the delivery paths) and starts the service before the
  listeners open. Both ways run the same code.

Every decision fails closed: an exception or an undecidable check is a refusal, logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.broker import Action, Broker
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from blendsm.broker import BlendBroker
from blendsm.errors import ConfigError

__all__ = ["MarketplacePlugin"]


class MarketplacePlugin(BaseAuthPlugin, BaseTopicPlugin):
    """CONNECT tokens and Registry membership, Market access, metered paid delivery."""

    @dataclass
    class Config:
        """Options under ``plugins: blendsm.plugins.MarketplacePlugin:`` in an amqtt YAML."""

        config: str | None = None
        """Path of the BlendSM broker YAML (chain, operator key, payments, data_dir,
        public_topics; its ``listen`` section is ignored: amqtt's listeners apply). Required
        in a plain amqtt broker; ignored under ``blendsm broker``, which passes its own."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        broker: Broker = context._broker_instance
        self._broker = broker
        self._runtime: Any = None
        if isinstance(broker, BlendBroker) and broker._blendsm is not None:
            return
        path = getattr(self.config, "config", None)
        if not path:
            raise ConfigError(
                "blendsm.plugins.MarketplacePlugin: give `config: <path to the BlendSM broker"
                " YAML>` in the plugin options"
            )
        from blendsm.broker import load_config

        self._blendsm_config = load_config(path)  # fails now, naming the field, if invalid
        broker.__class__ = BlendBroker  # same instance, our delivery-path overrides

    async def on_broker_pre_start(self, *args: Any, **kwargs: Any) -> None:
        broker = self._broker
        if not isinstance(broker, BlendBroker) or broker._blendsm is not None:
            return
        from blendsm.broker import MarketplaceService, connect_chain

        chain = await connect_chain(self._blendsm_config)
        service = MarketplaceService(
            config=self._blendsm_config,
            w3=chain.w3,
            deployment=chain.deployment,
            operator=chain.operator,
        )
        broker.attach_service(service)
        await service.start()
        self._runtime = (service, chain)

    async def on_broker_post_shutdown(self, *args: Any, **kwargs: Any) -> None:
        if self._runtime is not None:
            service, chain = self._runtime
            self._runtime = None
            await service.stop()
            await chain.close()

    async def authenticate(self, *, session: Session) -> bool | None:
        """Decided by the broker before any session take-over; report that decision."""
        return bool(getattr(session, "blendsm_authenticated", False))

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        broker = self._broker
        if session is None or topic is None or not isinstance(broker, BlendBroker):
            return False
        try:
            service = broker.service
            if action is Action.RECEIVE:
                return service.allow_receive(session, topic)
            if action is Action.SUBSCRIBE:
                return service.allow_subscribe(session, topic)
            return service.allow_publish(session, topic)
        except Exception:
            broker.logger.exception("topic decision failed for %r: refusing", topic)
            return False
