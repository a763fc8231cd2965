"""``blendsm verify FILE``: a subscriber's record, made against the real broker and anvil, is
re-checked from the chain alone; tampering with the record (or a hostile broker) fails it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from blendsm.cli import main
from blendsm.device_sdk import (
    IntegrityEvent,
    IntegrityKind,
    ReceivedMessage,
)

TOPIC = "integrity/cli"
COUNT = 4


async def _record(market: Any, until: Any, tmp_path: Path) -> Path:
    """A record of COUNT messages, each with a proof the subscriber verified."""
    mp = market.mp
    await mp("seller").market.create_topic(TOPIC, 0)
    await market.wait_view(lambda: market.service.view.topic_for_name(TOPIC) is not None)
    record = tmp_path / "record.jsonl"
    sub = market.proving_subscriber(record)
    messages: list[ReceivedMessage] = []
    events: list[IntegrityEvent] = []
    sub.on_message = lambda _s, m: messages.append(m)
    sub.on_integrity = lambda _s, e: events.append(e)
    device = market.sdk_publisher(tmp_path / "device")
    try:
        await asyncio.to_thread(sub.connect)
        assert await asyncio.to_thread(sub.subscribe, TOPIC) == 0
        await asyncio.to_thread(device.connect)

        def publish() -> None:
            for i in range(COUNT):
                device.publish(TOPIC, b"reading %d" % i, qos=1)
            device.flush(10)

        await asyncio.to_thread(publish)
        assert await until(lambda: len(messages) == COUNT, 10)
        assert await asyncio.to_thread(sub.wait_idle, 10)
        assert await market.service.anchorer.anchor_now()
        assert await until(lambda: len(events) == COUNT, 10)
        assert [e.kind for e in events] == [IntegrityKind.PROOF_VERIFIED] * COUNT
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(device.close)
        await asyncio.to_thread(sub.disconnect)
    return record


async def _verify(
    capsys: pytest.CaptureFixture[str], record: Path, args: list[str]
) -> tuple[int, list[str]]:
    code = await asyncio.to_thread(main, ["verify", str(record), *args])
    out = capsys.readouterr().out
    return code, out.splitlines()


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    lines = [orjson.loads(line) for line in src.read_bytes().splitlines()]
    dst.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in edit(lines)))
    return dst


def _flip_last_byte(hex_text: str) -> str:
    raw = bytearray(bytes.fromhex(hex_text[2:]))
    raw[-1] ^= 0x01
    return "0x" + raw.hex()


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_verify_passes_an_honest_record_and_fails_tampered_ones(
    market: Any, until: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = market.chain
    record = await _record(market, until, tmp_path)
    deployment = tmp_path / "deployment.json"
    chain.deployment.save(deployment)
    operator = chain.addr("operator")
    common = ["--chain", chain.anvil.url, "--deployment", str(deployment), "--broker", operator]

    code, lines = await _verify(capsys, record, common)
    assert code == 0, lines
    assert len(lines) == COUNT + 1
    assert all(line.startswith("OK   line") for line in lines[:COUNT])
    assert "proof_verified" in lines[0]
    assert lines[-1].startswith(f"{COUNT} messages: {COUNT} ok, 0 failed; {COUNT} proven")

    code, lines = await _verify(capsys, record, [*common, "--json"])
    assert code == 0
    verdicts = [orjson.loads(line) for line in lines]
    assert [v["sequence"] for v in verdicts] == [1, 2, 3, 4]
    assert all(v["ok"] and v["verified"] for v in verdicts)
    assert all(v["proof"]["kind"] == "proof_verified" for v in verdicts)
    assert all(v["device"] == chain.addr("device") for v in verdicts)

    # Another broker's anchors do not prove these messages.
    other = [*common[:-1], chain.addr("stranger"), "--json"]
    code, lines = await _verify(capsys, record, other)
    assert code == 1
    assert {orjson.loads(line)["proof"]["kind"] for line in lines} == {"proof_unavailable"}

    def alter_message(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first = next(x for x in lines if x["type"] == "message" and x["envelope"])
        first["envelope"] = _flip_last_byte(first["envelope"])
        return lines

    def drop_message(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seconds = [x for x in lines if x["type"] == "message"][1]
        return [x for x in lines if x is not seconds]

    def replay_message(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*lines, next(x for x in lines if x["type"] == "message")]

    def lie_about_root(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for x in lines:
            if x["type"] == "proof" and x["sequence"] == 3:
                x["proof"] = ["0x" + "11" * 32]
                x["root"] = "0x" + "22" * 32
        return lines

    cases = {
        "altered": (alter_message, "bad_signature", 1),
        "dropped": (drop_message, "gap", 3),
        "replayed": (replay_message, "replay", 1),
        "proof": (lie_about_root, "proof_failed", 3),
    }
    for name, (edit, kind, sequence) in cases.items():
        tampered = _rewrite(record, tmp_path / f"{name}.jsonl", edit)
        code, lines = await _verify(capsys, tampered, [*common, "--json"])
        assert code == 1, name
        failed = [v for v in map(orjson.loads, lines) if not v["ok"]]
        assert len(failed) == 1, (name, failed)
        found = [e["kind"] for e in failed[0]["events"]]
        if failed[0]["proof"] is not None:
            found.append(failed[0]["proof"]["kind"])
        assert kind in found, (name, failed)
        assert failed[0]["sequence"] == sequence, (name, failed)

    code, lines = await _verify(capsys, tmp_path / "proof.jsonl", common)
    assert code == 1
    assert sum(line.startswith("FAIL") for line in lines) == 1
    assert "1 failed" in lines[-1]


async def test_verify_refuses_bad_arguments_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "record.jsonl"
    record.write_text("")
    base = ["--chain", "http://127.0.0.1:1", "--deployment", str(tmp_path / "d.json")]
    assert (
        main(["verify", str(tmp_path / "missing.jsonl"), *base, "--broker", "0x" + "1" * 40]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", str(record), *base, "--broker", "0x12"]) == 2
    assert "--broker: not an address" in capsys.readouterr().err
    assert main(["verify", str(record), *base, "--broker", "0x" + "1" * 40]) == 2
    assert "deployment" in capsys.readouterr().err
