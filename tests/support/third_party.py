"""Third-party amqtt plugins, loaded by dotted path from a plain amqtt config in tests: BlendSM
must keep their decisions and events working next to its own delivery path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from amqtt.broker import Action
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BasePlugin, BaseTopicPlugin

__all__ = ["DenyReceivePlugin", "PublishSentRecorder"]


class DenyReceivePlugin(BaseTopicPlugin):
    """A topic plugin that lets no one receive messages on ``blocked/...``."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        return not (action is Action.RECEIVE and (topic or "").startswith("blocked/"))


class PublishSentRecorder(BasePlugin[Any]):
    """An event plugin that records (client id, topic) of every PUBLISH written to a client."""

    sent: ClassVar[list[tuple[str, str]]] = []

    @dataclass
    class Config:
        pass

    async def on_mqtt_packet_sent(self, *, packet: Any, session: Any = None) -> None:
        if isinstance(packet, PublishPacket):
            self.sent.append((getattr(session, "client_id", ""), packet.topic_name))
