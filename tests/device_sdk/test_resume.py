"""The resume request and its answer on the wire: round trips and the bounds."""

from __future__ import annotations

import orjson
import pytest

from blendsm.device_sdk import (
    MAX_RESUME_DEVICES,
    RESUME,
    Resumed,
    ResumeRequest,
    Unserved,
    control_topic,
    decode_resume_request,
    decode_resumed,
    encode_resume_request,
    encode_resumed,
    is_resumed_payload,
    parse_control_topic,
)
from blendsm.errors import WireError

DEV = "0x" + "ab" * 20
DEV2 = "0x" + "cd" * 20


def test_request_round_trip_and_the_control_topic() -> None:
    request = ResumeRequest("r1", "sensors/t", {DEV: 41, DEV2: -1})
    payload = encode_resume_request(request)
    assert orjson.loads(payload)["from"] == {DEV: "42", DEV2: "0"}
    back = decode_resume_request(payload)
    assert back.request_id == "r1"
    assert back.topic == "sensors/t"
    assert sorted(back.after.values()) == [-1, 41]
    topic = control_topic(DEV, RESUME)
    assert parse_control_topic(topic) == (DEV, RESUME)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "resume", "request_id": "r", "topic": "t", "from": {}},
        {"type": "resume", "request_id": "r", "topic": "t/#", "from": {DEV: "1"}},
        {"type": "resume", "request_id": "r", "topic": "t", "from": {"0x12": "1"}},
        {"type": "resume", "request_id": "r", "topic": "t", "from": {DEV: "-1"}},
        {"type": "resume", "request_id": "r", "topic": "t", "from": [DEV]},
        {
            "type": "resume",
            "request_id": "r",
            "topic": "t",
            "from": {"0x" + f"{i:040x}": "1" for i in range(MAX_RESUME_DEVICES + 1)},
        },
    ],
)
def test_malformed_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(WireError):
        decode_resume_request(orjson.dumps({"v": 1, **body}))


def test_answer_round_trip() -> None:
    notice = Resumed("r1", "sensors/t", 7, (Unserved(DEV, 3, 9),))
    payload = encode_resumed(notice)
    assert is_resumed_payload(payload)
    back = decode_resumed(payload)
    assert back.served == 7
    assert back.unserved[0].first == 3
    assert back.unserved[0].last == 9
    assert back.unserved[0].device.lower() == DEV
    assert back.refused is None
    refused = decode_resumed(encode_resumed(Resumed("r2", "t", 0, refused="disabled")))
    assert refused.refused == "disabled"
    bad = orjson.loads(payload)
    bad["unserved"][0]["last"] = "1"
    with pytest.raises(WireError):
        decode_resumed(orjson.dumps(bad))
