"""The shared parsing of the chain commands: amounts, addresses, ids and topics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from blendsm.cli._support import (
    emit,
    format_wei,
    parse_address,
    parse_bytes32,
    parse_topic,
    parse_wei,
)
from blendsm.device_sdk import keccak256
from blendsm.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "wei"),
    [
        ("0", 0),
        ("1000", 1000),
        ("10wei", 10),
        ("1_000", 1000),
        ("2gwei", 2 * 10**9),
        ("2 GWEI", 2 * 10**9),
        ("1.5ether", 15 * 10**17),
        ("0.000000000000000001ether", 1),
        ("1eth", 10**18),
        ("3finney", 3 * 10**15),
    ],
)
def test_parse_wei_accepts_wei_and_units(text: str, wei: int) -> None:
    assert parse_wei(text) == wei


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not an amount"),
        ("ten", "not an amount"),
        ("1.5", "whole number of wei"),
        ("0.1gwei1", "not an amount"),
        ("1.0000000000000000001ether", "whole number of wei"),
        ("-1", "negative"),
        ("-2gwei", "negative"),
    ],
)
def test_parse_wei_refuses_what_is_not_a_whole_wei_amount(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_wei(text, "--deposit")


def test_format_wei_keeps_small_amounts_in_wei_and_shows_both_for_large() -> None:
    assert format_wei(999) == "999 wei"
    assert format_wei(10**16) == f"0.01 ETH ({10**16} wei)"
    assert format_wei(2 * 10**18) == f"2 ETH ({2 * 10**18} wei)"


def test_parse_address_checksums_and_refuses_junk() -> None:
    raw = "0x" + "ab" * 20
    assert parse_address(raw) == parse_address(raw.upper().replace("0X", "0x"))
    assert parse_address(raw) != raw  # checksummed: mixed case
    for junk in ("", "0x12", "0x" + "zz" * 20, "0x" + "ab" * 21):
        with pytest.raises(ConfigError, match="--payee: not an address"):
            parse_address(junk, "--payee")


def test_parse_bytes32_and_topics() -> None:
    value = "0x" + "11" * 32
    assert parse_bytes32(value, "channel") == bytes.fromhex("11" * 32)
    with pytest.raises(ConfigError, match="channel: expected 0x and 64 hex digits"):
        parse_bytes32("11" * 32, "channel")
    with pytest.raises(ConfigError, match="channel"):
        parse_bytes32("0x1234", "channel")
    assert parse_topic(value) == bytes.fromhex("11" * 32)
    assert parse_topic("sensors/berlin/temp") == keccak256(b"sensors/berlin/temp")
    with pytest.raises(ConfigError, match="empty"):
        parse_topic("")


def test_emit_prints_one_sorted_json_object_or_the_human_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = {"b": b"\x01\x02", "a": 1, "path": Path("x/y")}
    emit(argparse.Namespace(json=True), data, "ignored")
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {"a": 1, "b": "0x0102", "path": "x/y"}
    assert out.index('"a"') < out.index('"b"')
    emit(argparse.Namespace(json=False), data, ["line one", "line two"])
    assert capsys.readouterr().out == "line one\nline two\n"
