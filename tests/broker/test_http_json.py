"""The HTTP API's JSON encoder (white-box): amounts are uint256 and must stay exact."""

from __future__ import annotations

import json

import orjson

from blendsm.broker._http import ANCHORS_DEFAULT, ANCHORS_MAX, dumps


def test_dumps_keeps_uint256_amounts_exact() -> None:
    value = {"deposit": 2**256 - 1, "small": 5, "hex": "0xab", "nothing": None}
    assert orjson.loads(dumps({"small": 5})) == {"small": 5}
    text = dumps(value)
    assert str(2**256 - 1).encode() in text
    assert json.loads(text) == value


def test_anchor_listing_limits_are_bounded() -> None:
    assert 0 < ANCHORS_DEFAULT <= ANCHORS_MAX <= 1000
