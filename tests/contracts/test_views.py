"""Contract views through eth_abi (:mod:`blendsm.contracts._views`) answer exactly as web3's
contract layer does: every view and pure function of every contract in the suite is called
both ways with the same arguments, on a chain with state in it, and the results (values and
types) or the errors must be the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import enrol

from blendsm.contracts import Marketplace, Role
from blendsm.contracts._binding_base import Binding
from blendsm.contracts._views import USE_WEB3, view_call
from blendsm.errors import BlendsmError

MakeMp = Callable[[str], Marketplace]


def _samples(abi_type: str, chain: Any) -> list[Any]:
    """A few arguments of ``abi_type``: zero-ish, and one that state may exist for."""
    if abi_type.endswith("]"):
        return [[]]
    if abi_type == "address":
        return [chain.addr("seller"), "0x" + "00" * 20]
    if abi_type.startswith(("uint", "int")):
        return [0, 1]
    if abi_type == "bool":
        return [True]
    if abi_type.startswith("bytes") and abi_type != "bytes":
        return [bytes(int(abi_type[5:]))]
    if abi_type == "bytes":
        return [b""]
    if abi_type == "string":
        return ["demo/temp"]
    raise AssertionError(f"no sample for {abi_type}")


def _arguments(fn_abi: dict[str, Any], chain: Any) -> list[list[Any]]:
    """Argument lists: every input at its first sample, then each input at its second."""
    samples = [_samples(i["type"], chain) for i in fn_abi["inputs"]]
    base = [s[0] for s in samples]
    rows = [base]
    for index, options in enumerate(samples):
        for value in options[1:]:
            rows.append([*base[:index], value, *base[index + 1 :]])
    return rows


async def _raised(call: Any) -> BaseException:
    """What awaiting ``call`` raised (it must raise)."""
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


async def _both(binding: Binding, name: str, args: list[Any]) -> tuple[Any, Any]:
    """(ours, web3's): each a result, or the type and text of what it raised."""

    async def outcome(call: Any) -> Any:
        try:
            result = await call
        except Exception as exc:
            return ("raised", type(exc).__name__, str(exc))
        return (type(result).__name__, result)

    view = view_call(binding.contract, name)
    assert view is not None, name
    ours = await outcome(view.call(binding.contract, args))
    theirs = await outcome(binding.contract.functions[name](*args).call())
    return ours, theirs


async def test_every_view_answers_as_web3_does(chain: Any, mp: MakeMp) -> None:
    # Some state for the views to read: a seller with a topic, an operator with a root.
    await enrol(mp, chain, "seller", Role.SELLER)
    await enrol(mp, chain, "operator", Role.OPERATOR)
    await mp("seller").market.create_topic("demo/temp", 10**12)
    await mp("operator").anchors.anchor(1, bytes(range(32)), 3)
    market = mp("operator")
    bindings: list[Binding] = [
        market.registry,
        market.market,
        market.channels,
        market.anchors,
        market.ratings,
        market.brokers,
    ]
    compared = 0
    for binding in bindings:
        for fn_abi in binding.contract.abi:
            if fn_abi.get("type") != "function":
                continue
            if fn_abi.get("stateMutability") not in ("view", "pure"):
                continue
            name = fn_abi["name"]
            if sum(1 for f in binding.contract.abi if f.get("name") == name) > 1:
                assert view_call(binding.contract, name) is None  # overloaded: web3's path
                continue
            for args in _arguments(fn_abi, chain):
                ours, theirs = await _both(binding, name, args)
                if ours == USE_WEB3:
                    continue  # not covered: the binding asks web3 (tested below)
                assert ours == theirs, (binding.NAME, name, args)
                compared += 1
    assert compared >= 50, compared


async def test_a_view_with_arguments_the_encoder_refuses_gets_web3s_error(
    chain: Any, mp: MakeMp
) -> None:
    anchors = mp("operator").anchors
    view = view_call(anchors.contract, "latestBatchId")
    assert view is not None
    assert await view.call(anchors.contract, ["not an address"]) is USE_WEB3
    market = mp("operator").market  # a short bytes32 is refused, not padded (web3's rule)
    topic = view_call(market.contract, "topic")
    assert topic is not None
    assert topic.inputs == ["bytes32"]
    assert await topic.call(market.contract, [b"ab"]) is USE_WEB3
    with pytest.raises(BlendsmError) as ours:
        await anchors._read("latestBatchId", "not an address")

    async def through_web3() -> Any:  # web3 refuses while building the call
        return await anchors.contract.functions["latestBatchId"]("not an address").call()

    theirs = await _raised(through_web3())
    assert type(ours.value.__cause__) is type(theirs)


async def test_a_view_that_reverts_raises_the_same_error_both_ways(chain: Any, mp: MakeMp) -> None:
    market = mp("operator").market
    view = view_call(market.contract, "topicIdAt")
    assert view is not None
    raw = await _raised(view.call(market.contract, [10**6]))  # no such topic: a revert
    theirs = await _raised(market.contract.functions["topicIdAt"](10**6).call())
    assert (type(raw), str(raw)) == (type(theirs), str(theirs))
    with pytest.raises(BlendsmError):
        await market._read("topicIdAt", 10**6)
