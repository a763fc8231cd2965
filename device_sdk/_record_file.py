"""The Subscriber's record file: every market message (and proof obtained) as a JSON line.

Why: ``blendsm verify`` (see :func:`~blendsm.device_sdk.verify_record`, which reads these
lines back with :func:`~blendsm.device_sdk.read_record`) re-checks later, against the chain
alone, what a subscriber received; so the record keeps the envelope bytes as received and
the proofs as the broker sent them, not conclusions drawn from them.
"""

from __future__ import annotations

import os
import threading
from typing import IO, Any

import orjson

from ._control import Proof

__all__ = ["RecordFile"]


class RecordFile:
    """Appends JSON lines to ``path``, opened on the first line and flushed after each one
    (a crash loses at most the line being written). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    def message(
        self,
        topic: str,
        envelope: bytes,
        received_at: float,
        qos: int,
        retain: bool,
        verified: bool | None,
    ) -> None:
        """Record a market message: its envelope bytes as received and the live verdict."""
        self._append(
            {
                "type": "message",
                "topic": topic,
                "envelope": "0x" + envelope.hex(),
                "received_at": received_at,
                "qos": qos,
                "retain": retain,
                "verified": verified,
            }
        )

    def proof(
        self, topic: str, device: str, sequence: int, broker: str, proof: Proof, verdict: str
    ) -> None:
        """Record the inclusion proof ``broker`` sent for a message, with the live verdict."""
        self._append(
            {
                "type": "proof",
                "topic": topic,
                "device": device,
                "sequence": sequence,
                "broker": broker,
                "batch": proof.batch_id,
                "index": proof.index,
                "leaf": "0x" + proof.leaf.hex(),
                "root": "0x" + proof.root.hex(),
                "proof": ["0x" + p.hex() for p in proof.proof],
                "tx": None if proof.tx_hash is None else "0x" + proof.tx_hash.hex(),
                "verdict": verdict,
            }
        )

    def close(self) -> None:
        """Close the file (idempotent); a later line opens it again, appending."""
        with self._lock:
            record, self._file = self._file, None
        if record is not None:
            record.close()

    def _append(self, line: dict[str, Any]) -> None:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open
            self._file.write(orjson.dumps(line) + b"\n")
            self._file.flush()
