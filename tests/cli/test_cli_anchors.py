"""`blendsm anchors list` and `blendsm anchors verify` against anvil over JSON-RPC: batches
anchored with the operator's own binding from trees built with the SDK, results checked
against the chain with plain synchronous web3."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blendsm.contracts import Marketplace, disconnect
from blendsm.device_sdk import MerkleTree, Proof, encode_notice, leaf_hash

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

OPERATOR_ROLE = 3

Cli = Any  # the conftest's runner: cli(*argv) -> (code, out, err); cli.json(out)
Process = Callable[..., subprocess.CompletedProcess[str]]  # the conftest's blendsm_process


class Anchored:
    """Three batches of broker "operator": ids 1, 2 and 5 (ids need only grow)."""

    def __init__(self, chain: Any) -> None:
        self.broker = chain.addr("operator")
        self.trees = {
            1: MerkleTree([leaf_hash(f"one {i}".encode()) for i in range(5)]),
            2: MerkleTree([leaf_hash(b"lonely")]),
            5: MerkleTree([leaf_hash(f"five {i}".encode()) for i in range(8)]),
        }
        self.blocks: dict[int, int] = {}

    def proof(self, batch: int, index: int) -> list[bytes]:
        return self.trees[batch].proof(index)

    def leaf(self, batch: int, index: int) -> bytes:
        return self.trees[batch].leaves[index]


@pytest.fixture
def anchored(chain: Any, enrol: Callable[[str, int], None]) -> Anchored:
    enrol("operator", OPERATOR_ROLE)
    batches = Anchored(chain)

    async def anchor() -> None:
        w3 = chain.async_w3()
        try:
            mp = Marketplace(w3, chain.deployment, chain.accounts["operator"])
            for batch_id, tree in batches.trees.items():
                done = await mp.anchors.anchor(batch_id, tree.root, len(tree))
                batches.blocks[batch_id] = done.block_number
        finally:
            await disconnect(w3)

    asyncio.run(anchor())
    return batches


def _hexes(items: list[bytes]) -> str:
    return ",".join("0x" + p.hex() for p in items)


def test_list(chain: Any, cli: Cli, anchored: Anchored) -> None:
    code, out, err = cli("anchors", "list", "--broker", anchored.broker, "--json")
    assert code == 0, err
    data = cli.json(out)
    assert data["broker"] == anchored.broker
    assert data["latest_batch_id"] == 5
    assert (
        data["latest_batch_id"] == chain.DataAnchors.functions.latestBatchId(anchored.broker).call()
    )
    assert data["total"] == 3
    assert [b["batch"] for b in data["batches"]] == [5, 2, 1]
    for row in data["batches"]:
        root, leaves, at, block = chain.DataAnchors.functions.anchorOf(
            anchored.broker, row["batch"]
        ).call()
        assert (
            row["root"]
            == "0x" + bytes(root).hex()
            == "0x" + anchored.trees[row["batch"]].root.hex()
        )
        assert row["leaf_count"] == leaves == len(anchored.trees[row["batch"]])
        assert row["anchored_at"] == at
        assert row["block"] == block == anchored.blocks[row["batch"]]
        receipt = chain.w3.eth.get_transaction_receipt(row["tx"])
        assert receipt["blockNumber"] == block

    code, out, err = cli("anchors", "list", "--broker", anchored.broker.lower(), "--limit", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"broker {anchored.broker}: 3 anchored batches (latest batch id 5)")
    assert len(lines) == 4  # head, column titles, two batches
    assert lines[2].split()[:3] == ["5", "0x" + anchored.trees[5].root.hex(), "8"]
    assert lines[3].split()[:3] == ["2", "0x" + anchored.trees[2].root.hex(), "1"]

    code, out, err = cli("anchors", "list", "--broker", chain.addr("stranger"), "--json")
    assert code == 0, err
    assert cli.json(out) == {
        "broker": chain.addr("stranger"),
        "latest_batch_id": 0,
        "total": 0,
        "batches": [],
    }
    code, out, err = cli("anchors", "list", "--broker", "0x12")
    assert code == 2
    assert "--broker: not an address" in err


def test_verify_inline(chain: Any, cli: Cli, anchored: Anchored) -> None:
    leaf, proof = anchored.leaf(5, 3), anchored.proof(5, 3)
    assert chain.DataAnchors.functions.verify(anchored.broker, 5, leaf, proof).call() is True
    base = ("anchors", "verify", "--broker", anchored.broker)

    code, out, err = cli(
        *base, "--batch", "5", "--leaf", "0x" + leaf.hex(), "--proof", _hexes(proof)
    )
    assert code == 0, err
    assert out.startswith("OK    batch 5 of ")
    assert f"anchored root 0x{anchored.trees[5].root.hex()} (8 leaves" in out

    code, out, err = cli(
        *base, "--batch", "5", "--leaf", "0x" + leaf.hex(), "--proof", _hexes(proof), "--json"
    )
    assert code == 0, err
    data = cli.json(out)
    assert data["ok"] is True
    assert data["failed"] == 0
    (result,) = data["proofs"]
    assert result["chain_verify"] is True
    assert result["recomputed_ok"] is True
    assert result["anchored_root"] == result["computed_root"] == "0x" + anchored.trees[5].root.hex()

    # A batch of one leaf: the empty proof.
    code, out, err = cli(*base, "--batch", "2", "--leaf", "0x" + anchored.leaf(2, 0).hex())
    assert code == 0, err

    # The right proof for another leaf, a tampered sibling, the wrong batch: all exit 1.
    wrong_leaf = leaf_hash(b"never anchored")
    assert chain.DataAnchors.functions.verify(anchored.broker, 5, wrong_leaf, proof).call() is False
    code, out, err = cli(
        *base, "--batch", "5", "--leaf", "0x" + wrong_leaf.hex(), "--proof", _hexes(proof), "--json"
    )
    assert code == 1, err
    (result,) = cli.json(out)["proofs"]
    assert result["ok"] is False
    assert result["chain_verify"] is False
    assert result["recomputed_ok"] is False
    assert "not the anchored root" in result["detail"]

    tampered = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    code, out, err = cli(
        *base, "--batch", "5", "--leaf", "0x" + leaf.hex(), "--proof", _hexes(tampered)
    )
    assert code == 1
    assert out.startswith("FAIL  batch 5 of ")
    assert "not the anchored root" in out

    code, out, err = cli(
        *base, "--batch", "1", "--leaf", "0x" + leaf.hex(), "--proof", _hexes(proof)
    )
    assert code == 1
    code, out, err = cli(
        *base, "--batch", "3", "--leaf", "0x" + leaf.hex(), "--proof", _hexes(proof)
    )
    assert code == 1
    assert f"broker {anchored.broker} never anchored a batch 3" in out

    code, out, err = cli(*base, "--batch", "5", "--leaf", "0x1234")
    assert code == 2
    assert out == ""
    assert "leaf: expected 0x and 64 hex digits" in err
    code, out, err = cli("anchors", "verify", "--batch", "5", "--leaf", "0x" + leaf.hex())
    assert code == 2
    assert "give --broker, --batch, --leaf and --proof, or --proof-file" in err


def _notice(anchored: Anchored, batch: int, index: int, leaf: bytes | None = None) -> bytes:
    """The proof notice exactly as the broker publishes it over MQTT."""
    return encode_notice(
        Proof(
            request_id="r1",
            topic="weather/berlin",
            sequence=7,
            device="0x" + "11" * 20,
            leaf=leaf or anchored.leaf(batch, index),
            proof=tuple(anchored.proof(batch, index)),
            batch_id=batch,
            root=anchored.trees[batch].root,
            tx_hash=None,
            index=index,
        )
    )


def _record_proof(
    anchored: Anchored, batch: int, index: int, leaf: bytes | None = None
) -> dict[str, Any]:
    """A proof line as Subscriber(record_path=...) writes it."""
    return {
        "type": "proof",
        "topic": "weather/berlin",
        "device": "0x" + "22" * 20,
        "sequence": index,
        "broker": anchored.broker,
        "batch": batch,
        "index": index,
        "leaf": "0x" + (leaf or anchored.leaf(batch, index)).hex(),
        "root": "0x" + anchored.trees[batch].root.hex(),
        "proof": ["0x" + p.hex() for p in anchored.proof(batch, index)],
        "tx": None,
        "verdict": "proof_verified",
    }


def test_verify_proof_files(chain: Any, cli: Cli, anchored: Anchored, tmp_path: Path) -> None:
    mqtt = tmp_path / "notice.json"
    mqtt.write_bytes(_notice(anchored, 1, 4))  # the odd last leaf of 5
    code, out, err = cli("anchors", "verify", "--proof-file", str(mqtt))
    assert code == 2
    assert "names no broker; give --broker" in err
    code, out, err = cli(
        "anchors", "verify", "--proof-file", str(mqtt), "--broker", anchored.broker
    )
    assert code == 0, err
    assert "(weather/berlin seq 7 from 0x1111" in out

    bad = tmp_path / "bad-notice.json"
    bad.write_bytes(_notice(anchored, 1, 4, leaf=leaf_hash(b"forged")))
    code, out, err = cli(
        "anchors", "verify", "--proof-file", str(bad), "--broker", anchored.broker, "--json"
    )
    assert code == 1
    assert cli.json(out)["ok"] is False

    # A record file: message lines skipped, every proof line checked.
    record = tmp_path / "record.jsonl"
    lines = [
        {"type": "message", "topic": "weather/berlin", "envelope": "0x00", "received_at": 1.0},
        _record_proof(anchored, 5, 0),
        _record_proof(anchored, 5, 7),
        _record_proof(anchored, 1, 2),
    ]
    record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = cli("anchors", "verify", "--proof-file", str(record), "--json")
    assert code == 0, err
    data = cli.json(out)
    assert data["checked"] == 3
    assert data["failed"] == 0
    assert [p["batch"] for p in data["proofs"]] == [5, 5, 1]

    lines.append(_record_proof(anchored, 5, 1, leaf=anchored.leaf(5, 2)))  # a leaf swapped
    record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = cli("anchors", "verify", "--proof-file", str(record))
    assert code == 1
    assert out.splitlines()[-1] == "4 proofs: 3 hold, 1 do not"
    assert out.splitlines()[3].startswith("FAIL  batch 5")

    one = tmp_path / "one.json"
    one.write_text(json.dumps(_record_proof(anchored, 2, 0), indent=2))  # pretty-printed
    code, out, err = cli("anchors", "verify", "--proof-file", str(one))
    assert code == 0, err

    junk = tmp_path / "junk.json"
    junk.write_text("{not json\n")
    code, out, err = cli(
        "anchors", "verify", "--proof-file", str(junk), "--broker", anchored.broker
    )
    assert code == 2
    assert "not JSON" in err
    code, out, err = cli("anchors", "verify", "--proof-file", str(tmp_path / "missing.json"))
    assert code == 2
    assert "cannot read" in err
    code, out, err = cli(
        "anchors", "verify", "--proof-file", str(one), "--batch", "1", "--broker", anchored.broker
    )
    assert code == 2
    assert "not both" in err


def test_verify_subprocess_exit_codes(
    chain: Any, anchored: Anchored, cli: Cli, deployment_file: Path, blendsm_process: Process
) -> None:
    def verify(leaf_index: int, *extra: str) -> subprocess.CompletedProcess[str]:
        """Batch 5's leaf ``leaf_index`` against the proof of leaf 6."""
        return blendsm_process(
            "anchors", "verify", "--broker", anchored.broker, "--batch", "5",
            "--leaf", "0x" + anchored.leaf(5, leaf_index).hex(),
            "--proof", _hexes(anchored.proof(5, 6)),
            "--chain", chain.anvil.url, "--deployment", str(deployment_file), *extra,
        )  # fmt: skip

    done = verify(6)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK    batch 5")
    done = verify(5, "--json")
    assert done.returncode == 1, done.stderr
    assert cli.json(done.stdout)["ok"] is False
    assert done.stderr == ""
