"""Shared fixtures: one chain per session (embedded py-evm, and anvil over JSON-RPC),
the marketplace suite deployed once on each, and a snapshot reverted after every test.

Contract tests talk to the chain through plain synchronous web3 (so they check the
contracts independently of our async bindings); every test account is a TEST-ONLY key
derived from a label and funded at session start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.middleware import SignAndSendRawMiddlewareBuilder
from web3.providers.eth_tester import EthereumTesterProvider

from blendsm.contracts import (
    EMBEDDED,
    AnvilNode,
    Deployment,
    Marketplace,
    connect,
    deploy_suite,
    disconnect,
    load_artifact,
    new_embedded_chain,
    test_account,
)

#: Labels of the funded TEST-ONLY accounts every chain fixture provides.
ACCOUNT_LABELS = (
    "oracle",
    "seller",
    "buyer",
    "buyer2",
    "operator",
    "device",
    "device2",
    "validator",
    "stranger",
)
CHALLENGE_PERIOD = 3600


@dataclass
class Chain:
    """A chain with the suite deployed, seen through synchronous web3."""

    kind: str
    w3: Web3
    deployment: Deployment
    accounts: dict[str, LocalAccount]
    tester: Any = None
    anvil: AnvilNode | None = None
    contracts: dict[str, Contract] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Contract:
        # chain.Registry, chain.Market, ... and chain.Token (the TEST-ONLY ERC-20)
        contracts = self.__dict__.get("contracts", {})
        if name in contracts:
            return contracts[name]
        raise AttributeError(name)

    def addr(self, label: str) -> str:
        return self.accounts[label].address

    def snapshot(self) -> Any:
        if self.tester is not None:
            return self.tester.take_snapshot()
        return self.w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]

    def revert(self, snap: Any) -> None:
        if self.tester is not None:
            self.tester.revert_to_snapshot(snap)
        else:
            assert self.w3.provider.make_request("evm_revert", [snap])["result"]  # type: ignore[arg-type]

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def time_travel(self, seconds: int) -> None:
        """Mine a block ``seconds`` after the latest one (or later: eth-tester's pending block
        takes the wall clock, and a block cannot go back behind it on a slow machine)."""
        target = self.now() + seconds
        if self.tester is not None:
            pending = int(self.tester.get_block_by_number("pending")["timestamp"])
            self.tester.time_travel(max(target, pending))  # the pending block gets `target`
            self.tester.mine_blocks(1)
        else:
            self.w3.provider.make_request("evm_setNextBlockTimestamp", [target])  # type: ignore[arg-type]
            self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def async_w3(self) -> Any:
        if self.tester is not None:
            return connect(EMBEDDED, ethereum_tester=self.tester)
        assert self.anvil is not None
        return connect(self.anvil.url)

    def balance(self, token: Contract | None, who: str) -> int:
        if token is None:
            return int(self.w3.eth.get_balance(who))
        return int(token.functions.balanceOf(who).call())


def _build(kind: str, w3: Web3, tester: Any, anvil: AnvilNode | None) -> Chain:
    accounts = {label: test_account(label) for label in ACCOUNT_LABELS}
    w3.middleware_onion.inject(
        SignAndSendRawMiddlewareBuilder.build(list(accounts.values())), layer=0
    )
    if anvil is not None:
        for acct in accounts.values():
            w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**24)])  # type: ignore[arg-type]
    chain = Chain(kind=kind, w3=w3, deployment=None, accounts=accounts, tester=tester, anvil=anvil)  # type: ignore[arg-type]

    async def deploy() -> Deployment:
        w3a = chain.async_w3()
        try:
            return await deploy_suite(w3a, accounts["oracle"], challenge_period=CHALLENGE_PERIOD)
        finally:
            await disconnect(w3a)

    chain.deployment = asyncio.run(deploy())
    for name, address in chain.deployment.addresses.items():
        chain.contracts[name] = w3.eth.contract(address=address, abi=load_artifact(name)["abi"])
    token_art = load_artifact("BlendsmTestToken")
    factory = w3.eth.contract(abi=token_art["abi"], bytecode=token_art["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(
        factory.constructor().transact({"from": chain.addr("oracle")})
    )
    chain.contracts["Token"] = w3.eth.contract(
        address=receipt["contractAddress"], abi=token_art["abi"]
    )
    return chain


@pytest.fixture(scope="session")
def embedded_chain() -> Chain:
    accounts = [test_account(label).address for label in ACCOUNT_LABELS]
    tester = new_embedded_chain(fund=accounts)
    return _build("embedded", Web3(EthereumTesterProvider(tester)), tester, None)


@pytest.fixture(scope="session")
def anvil_chain() -> Iterator[Chain]:
    node = AnvilNode().start()
    try:
        yield _build(
            "anvil", Web3(Web3.HTTPProvider(node.url, request_kwargs={"timeout": 30})), None, node
        )
    finally:
        node.stop()


@pytest.fixture
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """The embedded chain, or the one named by indirect parametrisation ("anvil"),
    reverted to its pre-test state afterwards."""
    kind = getattr(request, "param", "embedded")
    c: Chain = request.getfixturevalue(f"{kind}_chain")
    snap = c.snapshot()
    try:
        yield c
    finally:
        c.revert(snap)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests parametrised onto anvil get the `anvil` marker, so `-m "not anvil"` skips them.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("chain") == "anvil":
            item.add_marker(pytest.mark.anvil)


@pytest.fixture
async def w3(chain: Chain) -> AsyncIterator[Any]:
    """An AsyncWeb3 on the test chain (for tests of our async bindings and broker parts)."""
    w3 = chain.async_w3()
    yield w3
    await disconnect(w3)


@pytest.fixture
def mp(chain: Chain, w3: Any) -> Callable[[str], Marketplace]:
    """A Marketplace signing as the account with this label (one Transactor per label)."""
    made: dict[str, Marketplace] = {}

    def make(label: str) -> Marketplace:
        if label not in made:
            made[label] = Marketplace(w3, chain.deployment, chain.accounts[label])
        return made[label]

    return make


class TcpProxy:
    """A TCP relay to a local port that can be taken down (listener and every link closed)
    and brought back on the same port: a chain node going away without losing its state.

    ``lose_reply_to(marker)`` arms a one-shot fault: the next request whose bytes contain
    ``marker`` (e.g. ``b"eth_sendRawTransaction"``) reaches the node in full, but the link is
    cut as the node's answer comes back, so the client never learns what the node did.
    ``cut()`` closes every link and keeps listening (the node dropped its idle connections).
    ``accepted``, ``links`` and ``sent`` say what a node would see: connections made, those
    open now, and every byte the clients sent.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.replies_lost = 0
        self.accepted = 0
        self.sent = bytearray()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._lose_marker: bytes | None = None

    def lose_reply_to(self, marker: bytes) -> None:
        self._lose_marker = marker

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def links(self) -> int:
        """Client connections relayed now."""
        return len(self._links) // 2

    def cut(self) -> None:
        for link in list(self._links):
            link.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.cut()
        self._links.clear()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._links |= {writer, up_writer}
        self.accepted += 1
        doomed = False  # this link carried the marked request: its answer is lost
        tail = b""  # the marker may straddle two reads

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            nonlocal doomed, tail
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    marker = self._lose_marker
                    if up and marker is not None and marker in tail + data:
                        self._lose_marker, doomed = None, True
                    if up:
                        self.sent += data
                        tail = (tail + data)[-64:]
                    if doomed and not up:  # the node answered: drop it and cut the link
                        self.replies_lost += 1
                        writer.close()
                        up_writer.close()
                        return
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._links -= {writer, up_writer}


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[int], TcpProxy]]:
    """``tcp_proxy(port)``: a started-on-demand relay to ``port``, stopped after the test."""
    made: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        made.append(TcpProxy(target_port))
        return made[-1]

    yield make
    for proxy in made:
        await proxy.stop()


@dataclass
class NodeLink:
    """The anvil node reached through a :class:`TcpProxy`: ``w3`` talks to it through
    ``proxy``, which takes the node away (``await proxy.stop()``) and brings it back."""

    proxy: TcpProxy
    w3: Any


@pytest.fixture
async def node_link(chain: Chain, tcp_proxy: Callable[[int], TcpProxy]) -> AsyncIterator[NodeLink]:
    """An AsyncWeb3 on the anvil chain through a started proxy. web3's own retries are off,
    so a cut link fails the request at once and the part under test has to retry."""
    assert chain.anvil is not None, "node_link needs the anvil chain"
    proxy = tcp_proxy(chain.anvil.port)
    await proxy.start()
    w3 = connect(f"http://127.0.0.1:{proxy.port}", request_timeout=2.0)
    w3.provider.exception_retry_configuration = None
    try:
        yield NodeLink(proxy, w3)
    finally:
        await disconnect(w3)
