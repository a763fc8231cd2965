"""The JSON-RPC client keeps its connections to the node alive (contracts._http_provider).

A counting TCP relay stands between the client and a real anvil node, so what is measured is
what the node would see: connections opened, and requests that still succeed after the node
side drops an idle connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from typing import Any

import pytest
from eth_typing import HexStr

from blendsm.contracts import connect, disconnect

pytestmark = pytest.mark.anvil


class _Relay:
    """127.0.0.1 relay to the node: counts accepted connections and can cut them all."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted = 0
        self.open: set[asyncio.StreamWriter] = set()
        self.requests = bytearray()
        """Every byte the client sent to the node."""
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray | None = None
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if log is not None:
                        log += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, self.requests), pump(up_reader, writer))
        finally:
            self.open.discard(writer)

    def cut(self) -> None:
        """The node side closes every connection (a node restart, an idle timeout)."""
        for writer in list(self.open):
            writer.close()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


@pytest.fixture
async def relay(anvil_chain: Any) -> Any:
    assert anvil_chain.anvil is not None
    r = _Relay(_port(anvil_chain.anvil.url))
    r.url = await r.start()  # type: ignore[attr-defined]
    yield r
    await r.stop()


async def test_sequential_requests_share_one_connection(relay: Any) -> None:
    w3 = connect(relay.url)
    try:
        numbers = [await w3.eth.block_number for _ in range(30)]
    finally:
        await disconnect(w3)
    assert len(numbers) == 30
    # web3 8 as shipped opens one connection per request (30 here)
    assert relay.accepted == 1


async def test_a_connection_the_node_closed_is_replaced_without_a_failed_request(
    relay: Any,
) -> None:
    w3 = connect(relay.url)
    try:
        first = await w3.eth.block_number
        relay.cut()
        await asyncio.sleep(0.05)  # the close reaches the client's idle connection
        again = [await w3.eth.block_number for _ in range(3)]
    finally:
        await disconnect(w3)
    assert again == [first] * 3
    assert relay.accepted == 2


async def test_concurrent_requests_are_bounded_by_the_pool(relay: Any) -> None:
    from blendsm.contracts._http_provider import MAX_CONNECTIONS

    w3 = connect(relay.url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # all 40 are first requests of the connection: each finds no session yet, and
            # only one may stay (the others closed, not left to the garbage collector)
            results = await asyncio.gather(*(w3.eth.block_number for _ in range(40)))
        finally:
            await disconnect(w3)
        gc.collect()
    assert len(results) == 40
    assert 1 <= relay.accepted <= MAX_CONNECTIONS
    assert not [w for w in caught if "Unclosed client session" in str(w.message)]


async def test_disconnect_closes_the_kept_connection(relay: Any) -> None:
    w3 = connect(relay.url)
    await w3.eth.block_number
    assert len(relay.open) == 1
    await disconnect(w3)
    for _ in range(50):
        if not relay.open:
            break
        await asyncio.sleep(0.02)
    assert not relay.open


async def test_the_chain_id_is_asked_once(relay: Any) -> None:
    """web3's default asks the node for its chain id before every contract view (its
    validation middleware): a second round trip per call."""
    w3 = connect(relay.url)
    try:
        assert await w3.eth.chain_id == 31337
        first = relay.requests.count(b'"eth_chainId"')  # web3's cache asks twice at first
        for _ in range(3):
            assert await w3.eth.chain_id == 31337
            await w3.eth.call({"to": "0x" + "00" * 20, "data": HexStr("0x")})
    finally:
        await disconnect(w3)
    assert relay.requests.count(b'"eth_call"') == 3
    assert 1 <= first <= 2
    assert relay.requests.count(b'"eth_chainId"') == first


@pytest.fixture
async def poa_node(anvil_chain: Any) -> Any:
    """The anvil node behind a JSON-RPC relay that answers blocks as a PoA node does: Besu
    QBFT and Clique put validators and seals in ``extraData`` (97 bytes here, Clique's
    minimum; web3's validation middleware refuses anything over 32). Besu does not run
    here; everything else is anvil's own answer."""
    from aiohttp import ClientSession, web

    assert anvil_chain.anvil is not None
    upstream = anvil_chain.anvil.url
    client = ClientSession()

    async def relay(request: web.Request) -> web.Response:
        body = await request.json()
        async with client.post(upstream, json=body) as response:
            answer = await response.json()
        if body.get("method", "").startswith("eth_getBlockBy") and answer.get("result"):
            answer["result"]["extraData"] = "0x" + "ab" * 97
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/", relay)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()
    await client.close()


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_a_transaction_goes_through_on_a_poa_node(chain: Any, poa_node: str) -> None:
    from blendsm.contracts import Marketplace, Role

    w3 = connect(poa_node)
    try:
        block = await w3.eth.get_block("latest")
        assert len(block["proofOfAuthorityData"]) == 97  # the 97 bytes, moved aside
        # the fee lookup of every transaction reads the latest block
        result = await Marketplace(
            w3, chain.deployment, chain.accounts["buyer2"]
        ).registry.apply_for_role(Role.BUYER)
    finally:
        await disconnect(w3)
    assert result.block_number > 0


async def test_a_websocket_endpoint_takes_the_same_settings(anvil_chain: Any) -> None:
    """connect() sets the chain-id cache and the middleware on every provider kind."""
    assert anvil_chain.anvil is not None
    w3 = connect(anvil_chain.anvil.url.replace("http://", "ws://"))
    await w3.provider.connect()
    try:
        assert [await w3.eth.chain_id for _ in range(2)] == [31337, 31337]
        block = await w3.eth.get_block("latest")
        assert block["number"] >= 0
        names = {name for _, name in w3.middleware_onion.middleware}
        assert "validation" not in names
        assert "ens_name_to_address" not in names
    finally:
        await disconnect(w3)
