"""End-to-end encryption of a paid topic against a real BlendSM broker and chain: the device
seals with the topic key, the broker forwards ciphertext, the seller's TopicKeyService grants
keys only to entitled subscribers of a topic the chain marks encrypted and rotates when a
subscriber's right ends."""

from __future__ import annotations

import asyncio
import os
import queue
import stat
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey

from blendsm.contracts import Policy
from blendsm.device_sdk import (
    FLAG_ENCRYPTED,
    TOPIC_KEYS_STATE_FILE,
    Publisher,
    TopicKeyring,
    TopicKeyService,
    decode_envelope,
)
from blendsm.errors import DecryptionError

from .conftest import Market


def _raw_subscriber(market: Market, label: str) -> tuple[Any, queue.Queue[tuple[str, bytes]]]:
    """A raw market client recording the exact bytes it receives on market topics."""
    client = market.client(label)
    raw: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client.mqtt.on_message = lambda _c, _u, m: raw.put((m.topic, bytes(m.payload)))
    return client, raw


async def _collect(
    raw: queue.Queue[tuple[str, bytes]], count: int, within: float = 5.0
) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        try:
            topic, payload = await asyncio.to_thread(raw.get, True, within)
        except queue.Empty:
            break
        if not topic.startswith("blendsm/"):
            got.append(payload)
    return got


@pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)
async def test_encrypted_topic_keys_reach_only_entitled_subscribers_and_rotate(
    market: Market, tmp_path: Path, until: Any
) -> None:
    chain, topic = market.chain, market.topic
    deployment = chain.deployment
    operator = chain.addr("operator")
    seller = chain.addr("seller")
    device_key = bytes(chain.accounts["device"].key)
    common: dict[str, Any] = {
        "host": market.host,
        "port": market.port,
        "broker": operator,
        "chain_id": deployment.chain_id,
    }
    await market.open_channel("buyer")
    channel2 = await market.open_channel("buyer2")

    service = TopicKeyService(
        bytes(chain.accounts["seller"].key),
        marketplace=market.mp("seller"),
        topics=[topic],
        state_dir=tmp_path / "seller",
        devices={chain.addr("device"): PrivateKey(device_key).public_key.format(False)},
        **common,
    )
    keyrings = {
        label: TopicKeyring(bytes(chain.accounts[label].key), topics={topic: seller}, **common)
        for label in ("device", "buyer", "buyer2")
    }
    publisher = Publisher(
        device_key,
        registry=deployment.address("Registry"),
        state_dir=tmp_path / "device",
        encryptor=keyrings["device"].encryptor,
        **common,
    )
    try:
        await asyncio.to_thread(service.connect)
        for keyring in keyrings.values():
            await asyncio.to_thread(keyring.connect)
        await asyncio.to_thread(publisher.connect)

        # No key goes out while the chain does not mark the topic encrypted, whatever the
        # service's configuration says.
        assert not await service.marked_encrypted(topic)
        assert await service.grant_devices() == []
        assert await service.grant(chain.addr("buyer")) == []
        assert service.subscribers(topic) == []
        await market.mp("seller").market.set_encrypted(market.topic_id, True)
        assert await service.marked_encrypted(topic)
        assert await market.mp("buyer").market.is_encrypted(market.topic_id)

        # Keys: the device gets one from config, buyers once the chain entitles them; the
        # public keys are recovered from the buyers' own channel-opening transactions.
        assert await service.grant_devices() == [topic]
        assert await service.grant(chain.addr("buyer")) == [topic]
        assert await service.grant(chain.addr("buyer2")) == [topic]
        assert await service.grant(chain.addr("seller")) == []  # no channel: not entitled
        for keyring in keyrings.values():
            assert await asyncio.to_thread(keyring.wait_for_epoch, topic, 1)
        path = tmp_path / "seller" / TOPIC_KEYS_STATE_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        buyer, raw1 = _raw_subscriber(market, "buyer")
        buyer2, raw2 = _raw_subscriber(market, "buyer2")
        for client in (buyer, buyer2):
            assert await client.connect() == 0
            assert await client.subscribe(topic, qos=1) == [1]

        readings = [b"secret reading 1", b"secret reading 2"]
        for reading in readings:
            publisher.publish(topic, reading)
        await asyncio.to_thread(publisher.flush)
        for raw, label in ((raw1, "buyer"), (raw2, "buyer2")):
            got = await _collect(raw, 2)
            assert len(got) == 2, label
            envelopes = [decode_envelope(data) for data in got]
            # The broker only ever carried ciphertext, flagged as such and signed over it.
            assert all(e.flags & FLAG_ENCRYPTED for e in envelopes)
            assert not any(r in data for data in got for r in readings)
            assert [keyrings[label].decrypt(topic, e.payload) for e in envelopes] == readings

        # buyer2's right ends: the seller denylists it. The watching service sees it on chain
        # and rotates by itself.
        watcher = asyncio.create_task(service.watch(interval=0.1))
        await market.mp("seller").market.set_policy(market.topic_id, Policy.DENYLIST)
        await market.mp("seller").market.set_access(market.topic_id, [chain.addr("buyer2")])
        assert await until(lambda: service.epoch(topic) == 2, 10)
        service.stop_watching()
        await watcher
        assert service.subscribers(topic) == [chain.addr("buyer")]
        assert await asyncio.to_thread(keyrings["buyer"].wait_for_epoch, topic, 2)
        assert await asyncio.to_thread(keyrings["device"].wait_for_epoch, topic, 2)
        assert await asyncio.to_thread(keyrings["buyer2"].wait_for_revocation, topic)
        assert keyrings["buyer2"].epochs(topic) == [1]

        new = [b"secret reading 3", b"secret reading 4"]
        for reading in new:
            publisher.publish(topic, reading)
        await asyncio.to_thread(publisher.flush)
        got = [decode_envelope(d) for d in await _collect(raw1, 2)]
        assert [keyrings["buyer"].decrypt(topic, e.payload) for e in got] == new
        # Whatever buyer2 still gets (here: nothing, the broker cuts it off), and even the
        # ciphertext the entitled buyer got, it cannot read: it never held epoch 2.
        late = [decode_envelope(d) for d in await _collect(raw2, 2, within=1.0)]
        for envelope in got + late:
            with pytest.raises(DecryptionError, match="no key for epoch 2"):
                keyrings["buyer2"].decrypt(topic, envelope.payload)
        assert not any(r in e.payload for e in late for r in new)

        # Closing a channel ends a right too: buyer2 is off the denylist but closing.
        await market.mp("seller").market.set_access(market.topic_id, [chain.addr("buyer2")], False)
        await market.mp("buyer2").channels.request_close(channel2)
        assert not await service.entitled(chain.addr("buyer2"), topic)
        assert await service.grant(chain.addr("buyer2")) == []
    finally:
        publisher.close()
        for keyring in keyrings.values():
            keyring.disconnect()
        service.disconnect()

    # A restart keeps the epoch, the key and the grants.
    again = TopicKeyService(
        bytes(chain.accounts["seller"].key),
        marketplace=market.mp("seller"),
        topics=[topic],
        state_dir=tmp_path / "seller",
        **common,
    )
    assert again.epoch(topic) == 2
    assert again.subscribers(topic) == [chain.addr("buyer")]
    assert os.stat(tmp_path / "seller" / TOPIC_KEYS_STATE_FILE).st_mode & 0o077 == 0
