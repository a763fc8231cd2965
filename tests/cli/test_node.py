"""``blendsm node``: the embedded chain as a real JSON-RPC server in its own process.

Every test talks to a real ``blendsm node`` subprocess over HTTP: the async bindings, plain
synchronous web3, raw JSON-RPC bodies, a real ``blendsm broker`` process and other CLI
commands. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from paho.mqtt.enums import CallbackAPIVersion
from web3 import Web3
from web3.exceptions import ContractCustomError
from web3.providers import HTTPProvider

from blendsm.cli import main
from blendsm.contracts import (
    Deployment,
    Marketplace,
    Role,
    Status,
    connect,
    disconnect,
    free_port,
    load_artifact,
    test_account,
)
from blendsm.device_sdk import ConnectTokenSigner
from blendsm.errors import ContractRevertError

STARTUP_TIMEOUT = 60.0


_PUMPS: dict[int, threading.Thread] = {}
"""id() of a child's stream -> the thread of the :class:`_Lines` reading it (it closes it)."""


class _Lines:
    """Lines of a child's stream, read on a thread so a test can wait with a timeout."""

    def __init__(self, stream: Any) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            with stream:  # closed here, at EOF: the child's pipe is not left to the GC
                for line in stream:
                    self.queue.put(line)
            self.queue.put(None)

        thread = threading.Thread(target=pump, daemon=True)
        _PUMPS[id(stream)] = thread
        thread.start()

    def next(self, timeout: float) -> str:
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; got {self.seen}") from None
        if line is None:
            raise AssertionError(f"stream closed; got {self.seen}")
        self.seen.append(line)
        return line

    def drained(self) -> list[str]:
        """Every line so far, without waiting."""
        while True:
            try:
                line = self.queue.get_nowait()
            except queue.Empty:
                return self.seen
            if line is None:
                return self.seen
            self.seen.append(line)

    def until(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.1, deadline - time.monotonic()))
            if needle in line:
                return line


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blendsm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):  # the child is gone: its pipes are at EOF
        if stream is None:
            continue
        pump = _PUMPS.pop(id(stream), None)
        if pump is None:
            stream.close()
        else:
            pump.join(timeout=10)  # it closes the stream at EOF
    return int(proc.returncode)


@dataclass
class Node:
    proc: subprocess.Popen[str]
    info: dict[str, Any]
    stderr: _Lines

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def deployment(self) -> Deployment:
        return Deployment.load(self.info["deployment"])

    def account(self, label: str) -> LocalAccount:
        return test_account(label)

    def key(self, label: str) -> str:
        return str(self.info["accounts"][label]["private_key"])

    def w3(self) -> Web3:
        return Web3(HTTPProvider(self.url))


def rpc(url: str, body: Any, *, raw: bool = False) -> tuple[int, Any]:
    """POST one JSON-RPC body; (HTTP status, decoded answer or None)."""
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text else None


def call(url: str, method: str, *params: Any) -> Any:
    status, answer = rpc(url, {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    assert status == 200, answer
    assert "result" in answer, answer
    return answer["result"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the module (started with --json); stopped with SIGINT at the end."""
    out = tmp_path_factory.mktemp("node") / "deployment.json"
    proc = _spawn("node", "--port", "0", "--out", str(out), "--json", "--challenge-period", "3600")
    assert proc.stdout is not None
    assert proc.stderr is not None
    stdout, stderr = _Lines(proc.stdout), _Lines(proc.stderr)
    try:
        info = json.loads(stdout.next(STARTUP_TIMEOUT))
    except BaseException:
        _stop(proc)
        raise
    yield Node(proc, info, stderr)
    assert _stop(proc, signal.SIGINT) == 0


@pytest.fixture
def snapshot(node: Node) -> Iterator[None]:
    """Revert the node to its state before the test (evm_snapshot / evm_revert)."""
    snap = call(node.url, "evm_snapshot")
    yield
    assert call(node.url, "evm_revert", snap) is True


# --- the start line ----------------------------------------------------------------------


def test_json_start_line_and_deployment_file(node: Node) -> None:
    info = node.info
    assert info["url"].startswith("http://127.0.0.1:")
    assert info["test_only"] is True
    labels = ["oracle", "operator", "seller", "device", "buyer", "buyer2"]
    assert list(info["accounts"]) == sorted(labels)
    for label in labels:
        account = test_account(label)
        assert info["accounts"][label] == {
            "address": account.address,
            "private_key": "0x" + account.key.hex(),
        }
    dep = node.deployment
    assert Path(info["deployment"]).is_absolute()
    assert dep.chain_id == info["chain_id"] == int(call(node.url, "eth_chainId"), 16)
    assert dep.deployer == info["oracle"] == test_account("oracle").address
    assert dep.challenge_period == 3600
    assert info["operator_enrolled"] == test_account("operator").address
    w3 = node.w3()
    for name, address in dep.addresses.items():
        assert len(w3.eth.get_code(address)) > 0, name
    for label in labels:
        assert w3.eth.get_balance(test_account(label).address) > 10**21
    # the node enrolled the operator: independently, through plain web3
    registry = w3.eth.contract(
        address=dep.address("Registry"), abi=load_artifact("Registry")["abi"]
    )
    operator = test_account("operator").address
    assert registry.functions.hasActiveRole(operator, int(Role.OPERATOR)).call() is True
    assert "TEST ONLY" in node.stderr.until("TEST ONLY", 5)


# --- (1) the async bindings over HTTP --------------------------------------------------------


async def test_bindings_apply_approve_and_read_back(node: Node, snapshot: None) -> None:
    w3 = connect(node.url)
    try:
        seller = Marketplace(w3, node.deployment, node.account("seller"))
        await seller.check()
        applied = await seller.registry.apply_for_role(Role.SELLER)
        assert (await seller.registry.participant(seller.address)).status is Status.PENDING
        approved = await seller.as_account(node.account("oracle")).registry.approve(seller.address)
        assert approved.block_number > applied.block_number
        participant = await seller.registry.participant(seller.address)
        assert (participant.role, participant.status) == (Role.SELLER, Status.ACTIVE)
        receipt = await w3.eth.get_transaction_receipt(approved.tx_hash)
        assert receipt["status"] == 1
        assert receipt["blockNumber"] == approved.block_number
    finally:
        await disconnect(w3)
    # independently: synchronous web3, logs and blocks as any client reads them
    sync = node.w3()
    registry = sync.eth.contract(
        address=node.deployment.address("Registry"), abi=load_artifact("Registry")["abi"]
    )
    assert registry.functions.isActive(node.account("seller").address).call() is True
    events = registry.events.Approved().get_logs(from_block=applied.block_number)
    assert [e["args"]["account"] for e in events] == [node.account("seller").address]
    block = sync.eth.get_block(approved.block_number, full_transactions=True)
    assert block["transactions"][0]["hash"] == approved.tx_hash
    assert block["transactions"][0]["from"] == node.account("oracle").address


# --- (2) reverts carry their data -------------------------------------------------------------


async def test_custom_errors_arrive_through_json_rpc(node: Node, snapshot: None) -> None:
    w3 = connect(node.url)
    try:
        mp = Marketplace(w3, node.deployment, node.account("buyer"))
        with pytest.raises(ContractRevertError) as not_oracle:
            await mp.registry.approve(node.account("buyer2").address)
        assert not_oracle.value.error_name == "AccessControlUnauthorizedAccount"
        assert not_oracle.value.error_args["account"] == node.account("buyer").address
        oracle = mp.as_account(node.account("oracle"))
        with pytest.raises(ContractRevertError) as wrong_status:
            await oracle.registry.approve(node.account("buyer2").address)
        assert wrong_status.value.error_name == "RegistryWrongStatus"
        assert wrong_status.value.error_args["account"] == node.account("buyer2").address
    finally:
        await disconnect(w3)
    # on the wire: code 3 and the ABI-encoded error in data, for eth_call and eth_estimateGas
    registry = node.w3().eth.contract(
        address=node.deployment.address("Registry"), abi=load_artifact("Registry")["abi"]
    )
    data = registry.encode_abi("approve", [node.account("buyer2").address])
    tx = {"from": node.account("oracle").address, "to": registry.address, "data": data}
    selector = "0x" + keccak(text="RegistryWrongStatus(address,uint8)")[:4].hex()
    for method, params in (("eth_call", [tx, "latest"]), ("eth_estimateGas", [tx])):
        status, answer = rpc(
            node.url, {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
        )
        assert status == 200
        assert answer["id"] == 7
        assert answer["error"]["code"] == 3
        assert answer["error"]["message"].startswith("execution reverted")
        assert answer["error"]["data"].startswith(selector)
    # and plain web3 decodes it as a custom error
    with pytest.raises(ContractCustomError) as custom:
        registry.functions.approve(node.account("buyer2").address).call(
            {"from": node.account("oracle").address}
        )
    assert str(custom.value.data).startswith(selector)


# --- (3) the JSON-RPC envelope ----------------------------------------------------------------


def test_batches_and_protocol_errors(node: Node) -> None:
    url = node.url
    status, answer = rpc(
        url,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            {"jsonrpc": "2.0", "id": "two", "method": "no_suchMethod", "params": []},
            {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # notification
            5,
            {"jsonrpc": "1.0", "id": 4, "method": "eth_chainId"},
            {"jsonrpc": "2.0", "id": 5, "method": "eth_getBalance", "params": {"a": 1}},
            {"jsonrpc": "2.0", "id": 6, "method": "eth_blockNumber"},
        ],
    )
    assert status == 200
    assert [a["id"] for a in answer] == [1, "two", None, 4, 5, 6]
    assert int(answer[0]["result"], 16) == node.info["chain_id"]
    assert answer[1]["error"]["code"] == -32601
    assert answer[2]["error"]["code"] == -32600
    assert answer[3]["error"]["code"] == -32600
    assert answer[4]["error"]["code"] == -32602
    assert answer[5]["result"].startswith("0x")

    status, answer = rpc(url, b'{"jsonrpc": "2.0", "id": 1, "method": ', raw=True)
    assert status == 200
    assert answer == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": answer["error"]["message"]},
    }
    assert answer["error"]["code"] == -32700
    assert rpc(url, [])[1]["error"]["code"] == -32600
    assert rpc(url, "eth_chainId")[1]["error"]["code"] == -32600
    assert rpc(url, {"jsonrpc": "2.0", "id": 3})[1]["error"]["code"] == -32600
    # invalid params reach the client as an error, not a crash
    bad = rpc(url, {"jsonrpc": "2.0", "id": 9, "method": "eth_getBalance", "params": ["0xzz"]})
    assert bad[1]["id"] == 9
    assert bad[1]["error"]["code"] in (-32602, -32000)
    # notifications alone get no body
    assert rpc(url, {"jsonrpc": "2.0", "method": "eth_chainId", "params": []}) == (204, None)
    # the body limit
    status, answer = rpc(url, b"[" + b" " * (9 * 1024 * 1024) + b"]", raw=True)
    assert status == 413
    assert answer["error"]["code"] == -32600
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert "JSON-RPC" in resp.read().decode()
    # still serving
    assert int(call(url, "eth_chainId"), 16) == node.info["chain_id"]


# --- (4) dev methods --------------------------------------------------------------------------


def test_time_travel_and_snapshots(node: Node, snapshot: None) -> None:
    w3 = node.w3()
    before = w3.eth.get_block("latest")
    assert call(node.url, "evm_increaseTime", 3600) == "0xe10"
    assert call(node.url, "evm_mine") == "0x0"
    after = w3.eth.get_block("latest")
    assert after["timestamp"] >= before["timestamp"] + 3600
    assert after["number"] > before["number"]

    target = after["timestamp"] + 86_400
    call(node.url, "evm_setNextBlockTimestamp", hex(target))
    call(node.url, "evm_mine")
    assert w3.eth.get_block("latest")["timestamp"] == target
    call(node.url, "evm_mine", {"timestamp": target + 10})
    assert w3.eth.get_block("latest")["timestamp"] == target + 10
    _status, answer = rpc(
        node.url,
        {"jsonrpc": "2.0", "id": 1, "method": "evm_setNextBlockTimestamp", "params": [target]},
    )
    assert answer["error"]["code"] == -32602  # not ahead of the latest block
    assert "latest block" in answer["error"]["message"]

    snap = call(node.url, "evm_snapshot")
    number = w3.eth.block_number
    call(node.url, "evm_mine", {"blocks": 3})
    assert w3.eth.block_number == number + 3
    assert call(node.url, "evm_revert", snap) is True
    assert w3.eth.block_number == number
    assert call(node.url, "evm_revert", "0x999") is False


# --- (5) a real broker on the node ------------------------------------------------------------


def _mqtt_connack(port: int, signer: ConnectTokenSigner) -> int:
    got: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="node-test")
    client.username_pw_set(signer.address, signer.token("node-test"))
    client.on_connect = lambda _c, _u, _f, rc, _p: got.put(int(getattr(rc, "value", rc)))
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        return got.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_broker_runs_on_the_node(node: Node, tmp_path: Path, snapshot: None) -> None:
    # a buyer joins through the node, so the broker has a member to admit
    w3 = connect(node.url)
    try:
        buyer = Marketplace(w3, node.deployment, node.account("buyer2"))
        await buyer.registry.apply_for_role(Role.BUYER)
        await buyer.as_account(node.account("oracle")).registry.approve(buyer.address)
    finally:
        await disconnect(w3)
    config = tmp_path / "broker.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        f"chain:\n  endpoint: {node.url}\n  deployment: {node.info['deployment']}\n"
        "  confirmations: 0\n  poll_interval: 0.2\n"
        "operator_key: {env: BLENDSM_OPERATOR_KEY}\n"
        f"data_dir: {tmp_path / 'data'}\n"
        "log_level: WARNING\n"
    )
    broker = _spawn("broker", "-c", str(config), env={"BLENDSM_OPERATOR_KEY": node.key("operator")})
    assert broker.stdout is not None
    assert broker.stderr is not None
    errors = _Lines(broker.stderr)  # drained, so the broker never blocks on a full pipe
    try:
        try:
            line = _Lines(broker.stdout).until("listening on", 60)
        except AssertionError:
            await asyncio.sleep(1)  # let the pump collect stderr
            raise AssertionError(f"broker did not start: {errors.drained()}") from None
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        assert node.info["accounts"]["operator"]["address"] in line
        chain_id = node.info["chain_id"]
        operator = node.info["accounts"]["operator"]["address"]

        def signer(label: str) -> ConnectTokenSigner:
            return ConnectTokenSigner(bytes(test_account(label).key), chain_id, operator)

        assert await _to_thread(_mqtt_connack, port, signer("buyer2")) == 0
        assert await _to_thread(_mqtt_connack, port, signer("stranger")) != 0  # not a member
    finally:
        code = _stop(broker)
    assert code == 0


async def _to_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# --- other commands against the node ----------------------------------------------------------


def test_deploy_command_against_the_node(node: Node, tmp_path: Path, snapshot: None) -> None:
    out = tmp_path / "second.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blendsm.cli",
            "deploy",
            "--chain",
            node.url,
            "--key-env",
            "NODE_TEST_KEY",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_TEST_KEY": node.key("buyer")},
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    second = Deployment.load(out)
    assert printed["addresses"] == second.addresses
    assert second.chain_id == node.info["chain_id"]
    assert second.deployer == node.account("buyer").address
    w3 = node.w3()
    for address in second.addresses.values():
        assert address not in node.deployment.addresses.values()
        assert len(w3.eth.get_code(address)) > 0


def test_registry_command_with_the_printed_environment(node: Node, snapshot: None) -> None:
    """What the node prints (BLENDSM_CHAIN, BLENDSM_DEPLOYMENT, BLENDSM_KEY) is enough."""
    env = {
        "BLENDSM_CHAIN": node.url,
        "BLENDSM_DEPLOYMENT": node.info["deployment"],
        "BLENDSM_KEY": node.key("device"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "blendsm.cli", "registry", "apply", "--role", "buyer"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    registry = node.w3().eth.contract(
        address=node.deployment.address("Registry"), abi=load_artifact("Registry")["abi"]
    )
    role, status = registry.functions.participant(node.account("device").address).call()
    assert (Role(role), Status(status)) == (Role.BUYER, Status.PENDING)


def test_operator_registers_a_broker_on_the_node(node: Node, snapshot: None) -> None:
    """The node's enrolled operator registers a broker with `blendsm operator broker add`;
    `list --all` and the Brokers contract (plain web3) show it."""
    env = {
        **os.environ,
        "BLENDSM_CHAIN": node.url,
        "BLENDSM_DEPLOYMENT": node.info["deployment"],
        "BLENDSM_KEY": node.key("operator"),
    }
    key = test_account("node-broker").address

    def blendsm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "blendsm.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    added = blendsm("operator", "broker", "add", key, "--endpoint", "mqtt://127.0.0.1:1883")
    assert added.returncode == 0, added.stderr
    listed = blendsm("operator", "broker", "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["brokers"]
    operator = node.account("operator").address
    assert (row["broker"], row["operator"], row["active"]) == (key, operator, True)
    brokers = node.w3().eth.contract(
        address=node.deployment.address("Brokers"), abi=load_artifact("Brokers")["abi"]
    )
    assert brokers.functions.isActiveBroker(key).call()
    assert brokers.functions.operatorBrokers(operator).call() == [key]


# --- (6) human output and a clean stop ----------------------------------------------------------


def test_human_output_and_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "dep.json"
    proc = _spawn("node", "--port", "0", "--out", str(out), "--accounts", "alice,operator,bob")
    assert proc.stdout is not None
    lines = _Lines(proc.stdout)
    try:
        first = lines.next(STARTUP_TIMEOUT)
        assert "listening on http://127.0.0.1:" in first
        url = first.split("listening on ")[1].strip()
        rest = lines.until("Serving until", 10)
        text = "".join(lines.seen)
        assert "TEST ONLY" in text
        for label in ("alice", "operator", "bob"):
            key = "0x" + test_account(label).key.hex()
            assert f"# {label}: {test_account(label).address}\nexport BLENDSM_KEY={key}\n" in text
        operator = test_account("operator")
        assert f"export BLENDSM_OPERATOR_KEY=0x{operator.key.hex()}" in text
        assert f"{operator.address} enrolled by the node as an active Operator" in text
        assert f"export BLENDSM_CHAIN={url}" in text
        assert f"export BLENDSM_DEPLOYMENT={out}" in text
        assert rest.startswith("Serving until")
        # alice deployed and is the oracle
        dep = Deployment.load(out)
        assert dep.deployer == test_account("alice").address
        assert int(call(url, "eth_chainId"), 16) == dep.chain_id
        registry = Web3(HTTPProvider(url)).eth.contract(
            address=dep.address("Registry"), abi=load_artifact("Registry")["abi"]
        )
        assert registry.functions.hasActiveRole(operator.address, int(Role.OPERATOR)).call()
    finally:
        code = _stop(proc, signal.SIGTERM)
    assert code == 0
    port = int(url.rsplit(":", 1)[1])
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=2),
    ):
        pass


def test_no_deploy_funds_only(tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    proc = _spawn("node", "--port", "0", "--no-deploy", "--out", str(out), "--json")
    assert proc.stdout is not None
    try:
        info = json.loads(_Lines(proc.stdout).next(STARTUP_TIMEOUT))
        assert info["deployment"] is None
        assert info["operator_enrolled"] is None
        w3 = Web3(HTTPProvider(info["url"]))
        assert w3.eth.get_balance(test_account("seller").address) > 0
        assert w3.eth.get_transaction_count(test_account("oracle").address) == 0
    finally:
        assert _stop(proc) == 0
    assert not out.exists()


# --- errors -------------------------------------------------------------------------------------


def test_busy_port_and_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["node", "--port", str(port), "--no-deploy", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("blendsm: error: cannot listen on 127.0.0.1:")
    assert err.count("\n") == 1
    assert main(["node", "--accounts", "a,,b", "--port", str(free_port())]) == 2
    assert "--accounts" in capsys.readouterr().err
    assert main(["node", "--challenge-period", "0"]) == 2
    assert "--challenge-period" in capsys.readouterr().err
    assert main(["node", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
