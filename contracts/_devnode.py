"""A development chain served over JSON-RPC: the embedded EVM (eth-tester + py-evm) as a
node that other processes (the CLI, ``blendsm broker``, web3, ethers) can talk to.

The embedded chain of :func:`~blendsm.contracts.new_embedded_chain` vanishes with the process
that made it, so a developer without anvil has no chain for multi-step work across processes.
:func:`start_dev_node` (what ``blendsm node`` runs) keeps one alive: it funds TEST-ONLY
accounts (:func:`~blendsm.contracts.test_account`), deploys the suite with the first account
as oracle, enrols the ``operator`` account as an active Operator, and answers JSON-RPC 2.0.

Requests are answered by web3's ``EthereumTesterProvider.make_request`` with the request and
result formatters web3 itself applies in-process, so a client over HTTP sees what an
in-process client sees, encoded as the Ethereum JSON-RPC spec wants (quantities as hex).
Reverts come back as error code 3 with the revert data in ``data``, as geth and anvil send
them, so clients decode custom errors. The tester is not thread-safe: every request runs on
the event loop, one at a time.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blendsm.contracts._deploy import DEFAULT_CHALLENGE_PERIOD
from blendsm.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web
    from eth_account.signers.local import LocalAccount
    from web3 import AsyncWeb3

    from blendsm.contracts._deploy import Deployment

__all__ = ["DEV_ACCOUNT_LABELS", "DevChainRpc", "DevNode", "enrol_operator", "start_dev_node"]

_log = logging.getLogger("blendsm.node")

#: TEST-ONLY accounts funded at start; the first one deploys the suite and is the oracle.
DEV_ACCOUNT_LABELS = ("oracle", "operator", "seller", "device", "buyer", "buyer2")
#: The label enrolled as an active Operator at start (the broker's account).
OPERATOR_LABEL = "operator"
#: Wei given to each account: plenty for development, nothing of value.
FUNDING = 10**23

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 1000

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
#: What geth and anvil answer for a reverted eth_call / eth_estimateGas.
EXECUTION_REVERTED = 3

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")


class RpcError(Exception):
    """A JSON-RPC error object to send back (code, message, optional data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class DevChainRpc:
    """JSON-RPC 2.0 over one eth-tester chain: decoding, dispatch, encoding, dev methods.

    Synchronous on purpose: the caller runs it on one thread (the event loop), since the
    tester must never see two requests at once.
    """

    def __init__(self, tester: Any) -> None:
        from web3.providers.eth_tester import EthereumTesterProvider
        from web3.providers.eth_tester.middleware import request_formatters, result_formatters

        self.tester = tester
        self.provider = EthereumTesterProvider(tester)
        self._default_from = str(tester.get_accounts()[0])
        self._request_formatters: dict[str, Any] = {
            str(k): v for k, v in request_formatters.items()
        }
        self._result_formatters: dict[str, Any] = {
            str(k): v for k, v in (result_formatters or {}).items()
        }
        self._transaction_formatter: Any = self._result_formatters["eth_getTransactionByHash"]
        self._dev_methods = {
            "evm_snapshot": self._evm_snapshot,
            "evm_revert": self._evm_revert,
            "evm_increaseTime": self._evm_increase_time,
            "evm_setNextBlockTimestamp": self._evm_set_next_block_timestamp,
            "evm_mine": self._evm_mine,
        }

    # --- envelope ---------------------------------------------------------------------------

    def handle_body(self, body: bytes) -> Any:
        """The response to one HTTP body: a dict, a list (batch) or None (notifications only)."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error_response(None, RpcError(PARSE_ERROR, "Parse error: invalid JSON"))
        if isinstance(payload, list):
            if not payload:
                return _error_response(
                    None, RpcError(INVALID_REQUEST, "Invalid request: empty batch")
                )
            if len(payload) > MAX_BATCH:
                return _error_response(
                    None,
                    RpcError(INVALID_REQUEST, f"Invalid request: batch over {MAX_BATCH} calls"),
                )
            answers = [self.handle_one(item) for item in payload]
            kept = [answer for answer in answers if answer is not None]
            return kept or None
        return self.handle_one(payload)

    def handle_one(self, request: Any) -> dict[str, Any] | None:
        """One request object -> its response, None for a valid notification (no id)."""
        if not isinstance(request, dict):
            return _error_response(
                None, RpcError(INVALID_REQUEST, "Invalid request: not an object")
            )
        request_id = request.get("id")
        if not isinstance(request_id, str | int | float | type(None)) or isinstance(
            request_id, bool
        ):
            return _error_response(None, RpcError(INVALID_REQUEST, "Invalid request: bad id"))
        method = request.get("method")
        params = request.get("params", [])
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error_response(
                request_id,
                RpcError(INVALID_REQUEST, 'Invalid request: needs "jsonrpc": "2.0" and a method'),
            )
        if not isinstance(params, list):
            return _error_response(
                request_id,
                RpcError(INVALID_PARAMS, "Invalid params: this node takes positional params"),
            )
        try:
            result = self.call(method, params)
        except RpcError as exc:
            answer = _error_response(request_id, exc)
        else:
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return answer if "id" in request else None

    # --- dispatch ---------------------------------------------------------------------------

    def call(self, method: str, params: list[Any]) -> Any:
        """Run one method and return its JSON-ready result; raise RpcError on failure."""
        dev = self._dev_methods.get(method)
        if dev is not None:
            try:
                return _encode(dev(params))
            except RpcError:
                raise
            except Exception as exc:
                raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from exc
        return _encode(self._provider_call(method, params))

    def _provider_call(self, method: str, params: list[Any]) -> Any:
        from eth_tester.exceptions import (
            BlockNotFound,
            FilterNotFound,
            SnapshotNotFound,
            TransactionFailed,
            TransactionNotFound,
            ValidationError,
        )
        from eth_utils import ValidationError as EvmValidationError

        params = _normalise_params(method, params, self._default_from)
        formatter = self._request_formatters.get(method)
        try:
            if formatter is not None:
                params = list(formatter(params))
        except Exception as exc:
            raise RpcError(INVALID_PARAMS, f"Invalid params for {method}: {exc}") from exc
        try:
            response: Any = self.provider.make_request(method, params)  # type: ignore[arg-type]
        except TransactionFailed as exc:
            raise _revert_error(exc) from exc
        except (
            BlockNotFound,
            TransactionNotFound,
            FilterNotFound,
            SnapshotNotFound,
            ValidationError,
            EvmValidationError,
        ) as exc:  # what geth answers -32000 for: unknown block, nonce too low, no funds
            raise RpcError(SERVER_ERROR, f"{method}: {exc}") from exc
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise RpcError(INVALID_PARAMS, f"Invalid params for {method}: {exc}") from exc
        except Exception as exc:  # a bug here or in eth-tester: answer, log, keep serving
            _log.exception("%s failed", method)
            raise RpcError(INTERNAL_ERROR, f"{method}: {type(exc).__name__}: {exc}") from exc
        if "error" in response:
            error = response["error"]
            raise RpcError(int(error.get("code", SERVER_ERROR)), str(error.get("message", "")))
        result = response.get("result")
        result_formatter = self._result_formatters.get(method)
        if result_formatter is not None:
            result = result_formatter(result)
        if method in ("eth_getBlockByNumber", "eth_getBlockByHash") and isinstance(result, dict):
            # web3 remaps a block's keys but not those of its full transactions
            transactions = result.get("transactions", [])
            result["transactions"] = [
                self._transaction_formatter(tx) if isinstance(tx, dict) else tx
                for tx in transactions
            ]
        return result

    # --- dev methods (anvil / hardhat names) --------------------------------------------------

    def _latest_timestamp(self) -> int:
        return int(self.tester.get_block_by_number("latest")["timestamp"])

    def _evm_snapshot(self, params: list[Any]) -> str:
        return hex(int(self.tester.take_snapshot()))

    def _evm_revert(self, params: list[Any]) -> bool:
        """Back to a snapshot: true, or false for an unknown id (as anvil answers)."""
        from eth_tester.exceptions import SnapshotNotFound

        try:
            self.tester.revert_to_snapshot(_quantity(_param(params, 0, "snapshot id")))
        except SnapshotNotFound:
            return False
        return True

    def _evm_increase_time(self, params: list[Any]) -> int:
        """Move the clock ``seconds`` ahead of the latest block: the next block gets that
        time (eth-tester mines an empty block one second earlier to get there). Returns the
        seconds."""
        seconds = _quantity(_param(params, 0, "seconds"))
        if seconds < 0:
            raise RpcError(INVALID_PARAMS, "evm_increaseTime: seconds must not be negative")
        if seconds > 1:
            self._travel(self._latest_timestamp() + seconds)
        return seconds

    def _evm_set_next_block_timestamp(self, params: list[Any]) -> None:
        """The next block gets ``timestamp`` (via an empty block one second earlier)."""
        self._travel(_quantity(_param(params, 0, "timestamp")))

    def _evm_mine(self, params: list[Any]) -> str:
        """Mine one block, or ``[timestamp]`` / ``[{"timestamp": ts, "blocks": n}]``."""
        target: int | None = None
        blocks = 1
        if params and params[0] is not None:
            first = params[0]
            if isinstance(first, dict):
                if first.get("timestamp") is not None:
                    target = _quantity(first["timestamp"])
                blocks = _quantity(first.get("blocks", 1))
            else:
                target = _quantity(first)
        if blocks < 1:
            raise RpcError(INVALID_PARAMS, "evm_mine: blocks must be >= 1")
        if target is not None:
            self._travel(target)
        self.tester.mine_blocks(blocks)
        return "0x0"

    def _travel(self, target: int) -> None:
        """Make ``target`` the next block's time: eth-tester's time_travel mines an empty
        block at ``target - 1``, so that must still be after the latest block."""
        latest = self._latest_timestamp()
        if target <= latest + 1:
            raise RpcError(
                INVALID_PARAMS,
                f"timestamp {target} must be more than one second after the latest block's"
                f" {latest}",
            )
        self.tester.time_travel(target)


def _param(params: list[Any], index: int, what: str) -> Any:
    if len(params) <= index:
        raise RpcError(INVALID_PARAMS, f"missing parameter {index}: {what}")
    return params[index]


def _quantity(value: Any) -> int:
    """A JSON-RPC quantity: a 0x-hex string, or a plain integer as many clients send."""
    if isinstance(value, bool):
        raise RpcError(INVALID_PARAMS, f"not a quantity: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            pass
    raise RpcError(INVALID_PARAMS, f"not a quantity: {value!r}")


_CALL_METHODS = ("eth_call", "eth_estimateGas", "eth_createAccessList")


def _normalise_params(method: str, params: list[Any], default_from: str) -> list[Any]:
    """Call objects as other nodes take them: ``input`` for ``data`` (ethers, viem), and
    ``from`` optional in calls (eth-tester's funded first account, as web3 fills in-process:
    eth-tester charges gas even for calls, so the zero address would not do)."""
    if method in (*_CALL_METHODS, "eth_sendTransaction") and params and isinstance(params[0], dict):
        tx = dict(params[0])
        if "input" in tx:
            data = tx.pop("input")
            tx.setdefault("data", data)
        if method in _CALL_METHODS and tx.get("from") is None:
            tx["from"] = default_from
        params = [tx, *params[1:]]
    return params


def _revert_error(exc: BaseException) -> RpcError:
    """A revert as geth sends it: code 3, the reason if it is an Error(string), the raw
    revert data in ``data`` (the provider's own message has only its Python repr)."""
    raw = _revert_data(exc)
    message = "execution reverted"
    if raw is None:
        return RpcError(EXECUTION_REVERTED, f"{message}: {exc}")
    if raw.startswith(_ERROR_STRING_SELECTOR):
        try:
            from eth_abi import decode

            message += f": {decode(['string'], raw[4:])[0]}"
        except Exception:  # malformed Error(string): the raw data still goes out
            pass
    return RpcError(EXECUTION_REVERTED, message, "0x" + raw.hex())


def _revert_data(exc: BaseException) -> bytes | None:
    """The revert data under eth-tester's exceptions. Its estimate_gas keeps the bytes, its
    call only text: ``repr`` of the bytes for custom errors and panics (parsed back here), or
    the decoded reason of an Error(string) (encoded again here)."""
    from eth_abi import encode

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        arg: Any = error.args[0] if error.args else None
        if isinstance(arg, Exception) and arg.args:
            arg = arg.args[0]
        if isinstance(arg, bytes | bytearray):
            return bytes(arg)
    innermost = chain[-1].args[0] if chain[-1].args else None
    if isinstance(innermost, str):
        if innermost.startswith(("b'", 'b"')):
            try:
                literal = ast.literal_eval(innermost)
            except (ValueError, SyntaxError):
                literal = None
            if isinstance(literal, bytes):
                return literal
        return _ERROR_STRING_SELECTOR + encode(["string"], [innermost])
    return None


#: eth-tester keys web3's result formatters leave in snake case.
_KEY_FIXES = {"y_parity": "yParity"}


def _encode(value: Any, key: str | None = None) -> Any:
    """Python results -> Ethereum JSON-RPC: ints as hex quantities, bytes as hex data."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        if key == "logsBloom":
            return "0x" + value.to_bytes(256, "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        keys = {k: _KEY_FIXES.get(str(k), str(k)) for k in value}
        return {keys[k]: _encode(v, keys[k]) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} as JSON-RPC")


def _error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


# --- HTTP server ---------------------------------------------------------------------------


def build_app(rpc: DevChainRpc, chain_id: int) -> web.Application:
    """POST / answers JSON-RPC; GET / says what this is."""
    from aiohttp import web

    async def post(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            error = RpcError(INVALID_REQUEST, f"request body over {MAX_BODY_BYTES} bytes")
            return web.json_response(_error_response(None, error), status=413)
        answer = rpc.handle_body(body)
        if answer is None:
            return web.Response(status=204)
        return web.json_response(answer)

    async def get(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=f"blendsm node: the embedded development chain (chain id {chain_id}),"
            " JSON-RPC 2.0 over POST /. TEST ONLY.\n"
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/", post)
    app.router.add_get("/", get)
    return app


@dataclass
class DevNode:
    """A development chain served over JSON-RPC on ``url`` (see :func:`start_dev_node`);
    ``await stop()`` closes the server, and the chain is gone with it."""

    url: str
    chain_id: int
    deployment: Deployment | None
    """The suite deployed at start, None when started with ``deploy=False``."""
    accounts: dict[str, LocalAccount]
    """The funded TEST-ONLY accounts by label; the first one deployed the suite (the oracle)."""
    operator_enrolled: str | None
    """The address enrolled as an active Operator, if any."""
    rpc: DevChainRpc
    _runner: web.AppRunner

    async def stop(self) -> None:
        await self._runner.cleanup()


async def enrol_operator(
    w3: AsyncWeb3[Any], deployment: Deployment, operator: LocalAccount, oracle: LocalAccount
) -> None:
    """Make ``operator`` an active Operator of the Registry: it applies, the ``oracle``
    approves (DataAnchors only takes roots from active Operators). For development chains,
    where one process holds both keys."""
    from blendsm.contracts._bindings import Marketplace
    from blendsm.contracts._records import Role

    await Marketplace(w3, deployment, operator).registry.apply_for_role(Role.OPERATOR)
    await Marketplace(w3, deployment, oracle).registry.approve(operator.address)


async def _prepare_chain(
    accounts: dict[str, LocalAccount], *, deploy: bool, challenge_period: int
) -> tuple[Any, Deployment | None, str | None]:
    """A funded chain, with the suite deployed and the operator enrolled when ``deploy``."""
    from blendsm.contracts._connect import EMBEDDED, connect
    from blendsm.contracts._deploy import deploy_suite
    from blendsm.contracts._devchain import new_embedded_chain

    tester = new_embedded_chain(fund=[a.address for a in accounts.values()], amount=FUNDING)
    if not deploy:
        return tester, None, None
    w3 = connect(EMBEDDED, ethereum_tester=tester)
    oracle = next(iter(accounts.values()))
    deployment = await deploy_suite(w3, oracle, challenge_period=challenge_period)
    enrolled = None
    operator = accounts.get(OPERATOR_LABEL)
    if operator is not None and operator.address != oracle.address:
        await enrol_operator(w3, deployment, operator, oracle)
        enrolled = operator.address
    return tester, deployment, enrolled


async def start_dev_node(
    host: str = "127.0.0.1",
    port: int = 8545,
    *,
    labels: Sequence[str] = DEV_ACCOUNT_LABELS,
    deploy: bool = True,
    challenge_period: int = DEFAULT_CHALLENGE_PERIOD,
    deployment_path: Path | None = None,
) -> DevNode:
    """Start an embedded chain with the TEST-ONLY accounts of ``labels`` funded (keys from
    :func:`~blendsm.contracts.test_account`) and serve it over JSON-RPC on ``host:port``
    (0: a free port). With ``deploy``, the first account deploys the suite (the oracle),
    ``operator`` is enrolled as an active Operator, and the deployment is saved to
    ``deployment_path`` (if given) before the server listens. A port that cannot be bound
    is a :class:`~blendsm.errors.ConfigError`."""
    from aiohttp import web

    from blendsm.contracts._devchain import test_account

    accounts = {label: test_account(label) for label in labels}  # TEST ONLY keys
    tester, deployment, enrolled = await _prepare_chain(
        accounts, deploy=deploy, challenge_period=challenge_period
    )
    if deployment is not None and deployment_path is not None:
        deployment.save(deployment_path)
    rpc = DevChainRpc(tester)
    chain_id = int(rpc.call("eth_chainId", []), 16)
    runner = web.AppRunner(build_app(rpc, chain_id), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return DevNode(
        f"http://{shown}:{bound_port}", chain_id, deployment, accounts, enrolled, rpc, runner
    )
