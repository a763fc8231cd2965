"""Notices are encoded by hand (``_service._publish_qos0``) rather than by amqtt's
``PublishPacket``: the bytes must be exactly amqtt's, for every remaining-length width."""

from __future__ import annotations

import pytest
from amqtt.mqtt.publish import PublishPacket

from blendsm.broker._service import _publish_qos0


@pytest.mark.parametrize("size", [0, 1, 100, 124, 125, 200, 8192, 16_400, 2_100_000])
def test_a_notice_publish_is_byte_for_byte_amqtts(size: int) -> None:
    topic = "blendsm/ctl/0x" + "ab" * 20 + "/notice"
    payload = bytes(i % 251 for i in range(size))
    expected = PublishPacket.build(topic, payload, None, False, 0, False).to_bytes()
    assert _publish_qos0(topic, payload) == expected
