"""The device-side publisher: connects as a registered device and publishes market data.

For now it publishes payloads as given. Edge signing (topic, sequence, timestamp and payload
hash signed by the device key) will wrap the payload in :meth:`Publisher.encode_payload`,
the one seam every publish goes through.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from eth_account.signers.local import LocalAccount

from blendsm.errors import BrokerConnectionError, ConfigError

from ._control import is_control_topic
from ._mqtt import _MqttClient

__all__ = ["Publisher"]


class Publisher(_MqttClient):
    """An MQTT publisher authenticated with CONNECT tokens bound to ``broker`` (the broker
    operator's address) on ``chain_id``."""

    def __init__(
        self,
        account: LocalAccount | bytes,
        *,
        host: str,
        port: int,
        broker: str | bytes,
        chain_id: int,
        client_id: str | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
    ) -> None:
        super().__init__(
            account,
            host=host,
            port=port,
            broker=broker,
            chain_id=chain_id,
            client_id=client_id,
            clean_session=clean_session,
            keepalive=keepalive,
        )

    def encode_payload(self, topic: str, payload: bytes) -> bytes:
        """What goes on the wire for ``payload``: the payload itself for now; edge signing
        will return a signed envelope here."""
        return payload

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> mqtt.MQTTMessageInfo:
        """Publish ``payload`` on ``topic``; paho's MessageInfo.

        With ``wait`` (QoS 1/2), block until the broker acknowledged it, raising
        :class:`BrokerConnectionError` after ``timeout`` seconds. QoS 0 while disconnected
        raises too (paho would drop it); QoS 1/2 is queued and sent on reconnect.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ConfigError(f"payload: must be bytes, got {type(payload).__name__}")
        if is_control_topic(topic):
            raise ConfigError(f"topic: {topic!r} is in the reserved control tree")
        if qos not in (0, 1, 2):
            raise ConfigError(f"qos: must be 0, 1 or 2, got {qos!r}")
        try:
            info = self._publish(topic, self.encode_payload(topic, bytes(payload)), qos, retain)
        except ValueError as exc:  # paho: wildcards or empty topic
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"topic: {exc}") from exc
        if wait and qos > 0:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:  # paho: lost with the connection
                raise BrokerConnectionError(f"publish to {topic!r} failed: {exc}") from exc
            if not info.is_published():
                raise BrokerConnectionError(
                    f"publish to {topic!r} not acknowledged within {timeout:g} s"
                )
        return info
