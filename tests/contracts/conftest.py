"""Helpers for the contract tests, exposed as fixtures (test modules cannot import each
other under ``--import-mode=importlib``).

- ``reverts(error, *args)``: context manager; the block must revert with the custom error
  ``error`` (a name found in any artifact ABI, or a full signature such as
  ``"Panic(uint256)"``; ``""`` for a revert without data) and, if given, exactly these
  arguments (``...`` matches anything).
  Works on both chains: anvil raises web3's ``ContractLogicError`` with ``.data``; the
  embedded eth-tester provider raises ``eth_tester.exceptions.TransactionFailed`` whose
  message carries the revert bytes as a Python literal.
- ``events(receipt)``: every log of the receipt as ``("Contract.Event", {args})``, in order;
  ``events(receipt, "Event")``: the args of that event only.
- ``tx(fn, sender, value=0, gas=TX_GAS)``: transact a contract function call from a label
  or address with a fixed gas limit (``gas=None`` to estimate), wait, fail the test with the
  revert reason unless it succeeded, return the receipt.
- ``enrol(label, role)``: apply with ``role`` and have the oracle approve; the address.
- ``voucher(payer_label, channel_id, amount)``: the payer's 65-byte voucher signature of the
  on-chain ``voucherDigest`` (signed with coincurve, independently of the device SDK).
- ``open_channel(payer, payee, amount=...)``: open a native-coin channel; the channel id.
- ``reg``, ``mkt``, ``da``, ``rt``, ``brk``: the functions of Registry, Market, DataAnchors,
  Ratings, Brokers.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from functools import cache
from typing import Any

import coincurve
import pytest
from eth_abi import decode, encode
from eth_tester.exceptions import TransactionFailed
from eth_utils import event_abi_to_log_topic, function_signature_to_4byte_selector
from hexbytes import HexBytes
from support import enrol_raw
from web3._utils.events import get_event_data
from web3.exceptions import ContractLogicError

from blendsm.contracts import CONTRACT_NAMES, load_artifact

_REVERTED = "execution reverted: "


def _abi_type(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + item["type"][5:]
    return str(item["type"])


@cache
def _error_signatures() -> dict[str, set[str]]:
    sigs: dict[str, set[str]] = {"Error": {"Error(string)"}, "Panic": {"Panic(uint256)"}}
    for name in CONTRACT_NAMES:
        for item in load_artifact(name)["abi"]:
            if item["type"] == "error":
                types = ",".join(_abi_type(i) for i in item["inputs"])
                sigs.setdefault(item["name"], set()).add(f"{item['name']}({types})")
    return sigs


def _signature(error: str) -> str:
    if not error or "(" in error:
        return error
    found = _error_signatures().get(error)
    if not found:
        raise AssertionError(f"no error named {error!r} in any artifact ABI")
    if len(found) > 1:
        raise AssertionError(
            f"error name {error!r} is ambiguous: {sorted(found)}; give the signature"
        )
    return next(iter(found))


def revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data carried by ``exc``, or None if it is not a revert."""
    if isinstance(exc, ContractLogicError):
        data = exc.data
        if isinstance(data, dict):
            data = data.get("data")
        return bytes(HexBytes(data)) if data else b""
    if isinstance(exc, TransactionFailed):
        message = str(exc.args[0]) if exc.args else ""
        if not message.startswith(_REVERTED):
            return None
        rest = message[len(_REVERTED) :]
        if rest.startswith(("b'", 'b"')):
            return bytes(ast.literal_eval(rest))
        # web3's eth-tester provider already decoded an Error(string) reason
        return function_signature_to_4byte_selector("Error(string)") + _encode_string(rest)
    return None


def _encode_string(text: str) -> bytes:
    return encode(["string"], [text])


def _normalise(abi_type: str, value: Any) -> Any:
    if value is ...:
        return value
    if abi_type == "address":
        return str(value).lower()
    if abi_type.startswith("bytes") and abi_type != "bytes" and "[" not in abi_type:
        return bytes(HexBytes(value))
    if abi_type.startswith(("uint", "int")) and "[" not in abi_type:
        return int(value)
    return value


class Reverts:
    """Context manager checking that its block reverts with one custom error."""

    def __init__(self, error: str, args: tuple[Any, ...]) -> None:
        self.signature = _signature(error)
        self.expected = args
        if not self.signature:  # a bare revert: no data at all
            self.selector, self.types = b"", []
        else:
            self.selector = function_signature_to_4byte_selector(self.signature)
            self.types = [
                t for t in self.signature[self.signature.index("(") + 1 : -1].split(",") if t
            ]
        self.args: tuple[Any, ...] = ()  # decoded arguments, after the block
        self.data = b""

    def __enter__(self) -> Reverts:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        __tracebackhide__ = True
        if exc is None:
            pytest.fail(f"did not revert; expected {self.signature}")
        data = revert_data(exc)
        if data is None:
            return False  # not a revert: let it propagate
        self.data = data
        if data[:4] != self.selector or (not self.selector and data):
            pytest.fail(
                f"reverted with {self._name_of(data)} instead of {self.signature or 'no data'}"
            )
        self.args = tuple(decode(self.types, data[4:])) if self.types else ()
        if self.expected:
            assert len(self.expected) == len(self.types), "wrong number of expected arguments"
            want = [_normalise(t, v) for t, v in zip(self.types, self.expected, strict=True)]
            got = [_normalise(t, v) for t, v in zip(self.types, self.args, strict=True)]
            for i, (w, g) in enumerate(zip(want, got, strict=True)):
                if w is not ... and w != g:
                    pytest.fail(f"{self.signature}: argument {i} is {g!r}, expected {w!r}")
        return True

    @staticmethod
    def _name_of(data: bytes) -> str:
        if not data:
            return "no data"
        for sigs in _error_signatures().values():
            for sig in sigs:
                if function_signature_to_4byte_selector(sig) == data[:4]:
                    return f"{sig} (data 0x{data.hex()})"
        return f"unknown error 0x{data.hex()}"


@pytest.fixture
def reverts() -> Callable[..., Reverts]:
    """``with reverts("RegistryWrongStatus", account, 1): ...``"""

    def factory(error: str, *args: Any) -> Reverts:
        return Reverts(error, args)

    return factory


def _plain(value: Any) -> Any:
    if isinstance(value, HexBytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


@pytest.fixture
def events(chain: Any) -> Callable[..., list[Any]]:
    """Decode a receipt's logs with the ABIs of the contracts on ``chain``."""
    by_address: dict[str, tuple[str, dict[bytes, dict[str, Any]]]] = {}
    for name, contract in chain.contracts.items():
        topics = {
            event_abi_to_log_topic(item): item for item in contract.abi if item["type"] == "event"
        }
        by_address[contract.address.lower()] = (name, topics)

    def decode_logs(receipt: Any, event: str | None = None) -> list[Any]:
        out: list[tuple[str, dict[str, Any]]] = []
        for log in receipt["logs"]:
            name, topics = by_address.get(str(log["address"]).lower(), (str(log["address"]), {}))
            abi = topics.get(bytes(log["topics"][0])) if log["topics"] else None
            if abi is None:
                out.append((f"{name}.<unknown>", {"topics": log["topics"], "data": log["data"]}))
                continue
            decoded = get_event_data(chain.w3.codec, abi, log)
            out.append(
                (f"{name}.{decoded['event']}", {k: _plain(v) for k, v in decoded["args"].items()})
            )
        if event is None:
            return out
        return [args for full, args in out if full.split(".", 1)[1] == event]

    return decode_logs


def _sender(chain: Any, who: str) -> str:
    return chain.addr(who) if who in chain.accounts else who


#: Gas given to every ``tx`` unless told otherwise: skipping estimation makes a transaction
#: ~4x faster on py-evm, whose estimator executes it over and over in a binary search.
TX_GAS = 5_000_000


@pytest.fixture
def tx(chain: Any) -> Callable[..., Any]:
    def send(fn: Any, sender: str, value: int = 0, gas: int | None = TX_GAS) -> Any:
        __tracebackhide__ = True
        params: dict[str, Any] = {"from": _sender(chain, sender)}
        if value:
            params["value"] = value
        if gas is not None:  # None: let the node estimate
            params["gas"] = gas
        receipt = chain.w3.eth.wait_for_transaction_receipt(fn.transact(params))
        if receipt["status"] != 1:
            # Mined but failed: replay it as a call on the state before, for the reason.
            try:
                fn.call(params, block_identifier=receipt["blockNumber"] - 1)
            except Exception as exc:  # diagnostics only
                data = revert_data(exc)
                why = Reverts._name_of(data) if data is not None else repr(exc)
                pytest.fail(f"{fn.fn_name} from {sender} reverted: {why}")
            pytest.fail(f"{fn.fn_name} from {sender} failed (status 0, gas {gas})")
        return receipt

    return send


@pytest.fixture
def enrol(chain: Any, tx: Callable[..., Any]) -> Callable[[str, int], str]:
    return lambda label, role: enrol_raw(chain, tx, label, role)


def lane_of(pc: Any, channel_id: bytes) -> str:
    """The operator's own lane of a channel (zero for a channel with no operator or no channel):
    the lane a single-broker deployment signs and claims."""
    return str(pc.functions.channel(channel_id).call()[5])


@pytest.fixture
def voucher(chain: Any) -> Callable[[str, bytes, int], bytes]:
    def sign(payer: str, channel_id: bytes, amount: int) -> bytes:
        lane = lane_of(chain.PaymentChannels, channel_id)
        digest = chain.PaymentChannels.functions.voucherDigest(channel_id, lane, amount).call()
        key = coincurve.PrivateKey(bytes(chain.accounts[payer].key))
        sig = key.sign_recoverable(bytes(digest), hasher=None)  # r || s || recid, low s
        return sig[:64] + bytes([sig[64] + 27])

    return sign


@pytest.fixture
def open_channel(
    chain: Any, tx: Callable[..., Any], events: Callable[..., list[Any]]
) -> Callable[..., bytes]:
    def open_(
        payer: str, payee: str, amount: int = 10**15, operator: str | None = None, fee_bps: int = 0
    ) -> bytes:
        operator_addr = _sender(chain, operator) if operator else "0x" + "00" * 20
        fn = chain.PaymentChannels.functions.open(
            _sender(chain, payee), operator_addr, "0x" + "00" * 20, amount, fee_bps
        )
        (opened,) = events(tx(fn, payer, value=amount), "ChannelOpened")
        return bytes(opened["channelId"])

    return open_


def _functions_of(contract: str) -> Any:
    """A fixture: the functions of ``contract`` on the test chain (named where assigned)."""

    def functions(chain: Any) -> Any:
        return getattr(chain, contract).functions

    return pytest.fixture(functions)


reg = _functions_of("Registry")
mkt = _functions_of("Market")
da = _functions_of("DataAnchors")
rt = _functions_of("Ratings")
brk = _functions_of("Brokers")
