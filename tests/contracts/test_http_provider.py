"""The JSON-RPC client keeps its connections to the node alive (contracts._http_provider).

The tests' TCP relay (``TcpProxy``) stands between the client and a real anvil node, so what
is measured is what the node would see: connections opened, the requests sent, and requests
that still succeed after the node side drops an idle connection.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest
from eth_typing import HexStr

from blendsm.contracts import connect, disconnect

pytestmark = pytest.mark.anvil


@pytest.fixture
async def relay(anvil_chain: Any, tcp_proxy: Any) -> Any:
    """The shared TCP relay (conftest's ``TcpProxy``) in front of the anvil node."""
    assert anvil_chain.anvil is not None
    proxy = tcp_proxy(anvil_chain.anvil.port)
    await proxy.start()
    proxy.url = f"http://127.0.0.1:{proxy.port}"
    return proxy


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
    assert relay.links == 1
    await disconnect(w3)
    for _ in range(50):
        if not relay.links:
            break
        await asyncio.sleep(0.02)
    assert relay.links == 0


async def test_the_chain_id_is_asked_once(relay: Any) -> None:
    """web3's default asks the node for its chain id before every contract view (its
    validation middleware): a second round trip per call."""
    w3 = connect(relay.url)
    try:
        assert await w3.eth.chain_id == 31337
        first = relay.sent.count(b'"eth_chainId"')  # web3's cache asks twice at first
        for _ in range(3):
            assert await w3.eth.chain_id == 31337
            await w3.eth.call({"to": "0x" + "00" * 20, "data": HexStr("0x")})
    finally:
        await disconnect(w3)
    assert relay.sent.count(b'"eth_call"') == 3
    assert 1 <= first <= 2
    assert relay.sent.count(b'"eth_chainId"') == first


@pytest.fixture
async def poa_node(anvil_chain: Any) -> Any:
    """The anvil node behind a JSON-RPC relay that answers blocks as a PoA node does: Besu
    QBFT and Clique put validators and seals in ``extraData`` (97 bytes here, Clique's
    minimum; web3's block formatter refuses anything over 32). Besu does not run
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
