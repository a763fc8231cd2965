"""The same plugin loaded from a plain amqtt broker config (``plugins:`` with a dotted path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import Broker

from blendsm.broker import BlendBroker
from blendsm.errors import ConfigError

from .conftest import plain_amqtt_market


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_plain_amqtt_config_runs_the_marketplace(
    chain: Any, mp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, until: Any
) -> None:
    market = await plain_amqtt_market(chain, mp, tmp_path, monkeypatch, "paid/plain")
    broker, channel = market.broker, market.channel
    assert isinstance(broker, BlendBroker)  # upgraded in place by the plugin
    async with market.running(until) as (buyer, device, anon):
        assert await anon.connect() == 5  # public topics are off by default
        assert await buyer.connect() == 0
        assert await device.connect() == 0
        assert await buyer.subscribe("paid/plain") == [0]
        await device.publish("paid/plain", b"hello", qos=1)
        got = [m.payload for m in await buyer.got.drain(within=1.0) if m.topic == "paid/plain"]
        assert got == [b"hello"]
        assert broker.service.meter.accounts[channel].charged == 1_000


async def test_plain_amqtt_config_without_the_blendsm_file_fails_clearly() -> None:
    from amqtt.errors import PluginInitError

    with pytest.raises(PluginInitError) as caught:
        Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
                "plugins": {"blendsm.plugins.MarketplacePlugin": {}},
            }
        )
    cause = caught.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "config: <path to the BlendSM broker YAML>" in str(cause)
