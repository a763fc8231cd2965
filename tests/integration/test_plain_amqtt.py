"""The same plugin loaded from a plain amqtt broker config (``plugins:`` with a dotted path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from amqtt.broker import Broker
from support import enrol

from blendsm.broker import BlendBroker
from blendsm.contracts import Policy, Role, free_port
from blendsm.errors import ConfigError

from .conftest import anvil_broker_config


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_plain_amqtt_config_runs_the_marketplace(
    chain: Any,
    mp: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    until: Any,
    mqtt_client: Any,
) -> None:
    Client = mqtt_client  # noqa: N806
    for label, role in (("seller", Role.SELLER), ("buyer", Role.BUYER)):
        await enrol(mp, chain, label, role)
    await mp("seller").registry.add_device(chain.addr("device"))
    await mp("seller").market.create_topic("paid/plain", 1_000, None, Policy.OPEN)
    channel = (
        await mp("buyer").channels.open(chain.addr("seller"), chain.addr("operator"), None, 10**15)
    ).channel_id

    sections, env = anvil_broker_config(chain, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "blendsm.yaml").write_text(yaml.safe_dump(sections))
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "blendsm.plugins.MarketplacePlugin": {"config": str(tmp_path / "blendsm.yaml")}
            },
        }
    )
    assert isinstance(broker, BlendBroker)  # upgraded in place by the plugin
    await broker.start()
    clients: list[Any] = []
    try:
        service = broker.service
        await until(lambda: service.view.channel(channel) is not None, 10)
        signer = _signer(chain, "buyer")
        buyer = Client("127.0.0.1", port, account=chain.accounts["buyer"], signer=signer)
        device = Client(
            "127.0.0.1",
            port,
            account=chain.accounts["device"],
            signer=_signer(chain, "device"),
            envelope_signer=_envelope_signer(chain, "device"),
        )
        anon = Client("127.0.0.1", port)
        clients += [buyer, device, anon]
        assert await anon.connect() == 5  # public topics are off by default
        assert await buyer.connect() == 0
        assert await device.connect() == 0
        assert await buyer.subscribe("paid/plain") == [0]
        await device.publish("paid/plain", b"hello", qos=1)
        got = [m.payload for m in await buyer.got.drain(within=1.0) if m.topic == "paid/plain"]
        assert got == [b"hello"]
        assert service.meter.accounts[channel].charged == 1_000
    finally:
        for c in clients:
            c.close()
        await broker.shutdown()


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


def _signer(chain: Any, label: str) -> Any:
    from blendsm.device_sdk import ConnectTokenSigner

    return ConnectTokenSigner(
        bytes(chain.accounts[label].key), chain.deployment.chain_id, chain.addr("operator")
    )


def _envelope_signer(chain: Any, label: str) -> Any:
    from blendsm.device_sdk import EnvelopeSigner, MessageDomain

    deployment = chain.deployment
    return EnvelopeSigner(
        bytes(chain.accounts[label].key),
        MessageDomain(deployment.chain_id, deployment.address("Registry")),
    )
