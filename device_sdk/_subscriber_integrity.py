"""The Subscriber's integrity side: anchor notices, proof requests and integrity reports.

Apart from :mod:`._subscriber` (receiving and paying) so each stays readable; the work itself
is done by the verification worker of :mod:`._verification`, this mixin only connects the
Subscriber's MQTT client and callbacks to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from blendsm.errors import BlendsmError, ConfigError, WireError

from ._control import ProofRequest, decode_anchor_notice, encode_proof_request
from ._integrity import IntegrityEvent, MessageVerifier
from ._subscriber_events import IntegrityCallback

if TYPE_CHECKING:
    from ._verification import VerificationWorker

__all__ = ["SubscriberIntegrity"]

_log = logging.getLogger("blendsm.device_sdk")


class SubscriberIntegrity:
    """Mixin of :class:`~blendsm.device_sdk.Subscriber`: what it does with anchor notices and
    proofs (it sets every attribute declared here)."""

    verifier: MessageVerifier | None
    proof_topic: str
    client_id: str
    on_integrity: IntegrityCallback | None
    _verification: VerificationWorker
    _lock: threading.Condition
    _bad_notices: int
    _integrity_events: int
    _mqtt: mqtt.Client

    if TYPE_CHECKING:  # provided by the Subscriber and its MQTT client

        def _report_error(self, error: BlendsmError) -> None: ...

        def _guard(self, callback: Any, *args: Any) -> None: ...

    def _on_anchor_notice(self, payload: bytes) -> None:
        try:
            notice = decode_anchor_notice(payload)
        except WireError as exc:
            with self._lock:
                self._bad_notices += 1
            self._report_error(exc)
            return
        self._verification.anchor_noticed(notice)

    def _send_proof_request(self, request: ProofRequest) -> bool:
        info = self._mqtt.publish(self.proof_topic, encode_proof_request(request), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            _log.info("%s: proof request not sent (%s)", self.client_id, mqtt.error_string(info.rc))
            return False
        return True

    def request_proof(
        self, topic: str, device: str, sequence: int, timeout: float = 10.0
    ) -> IntegrityEvent:
        """Ask the broker for the proof of a message this subscriber received and check it
        against the on-chain root: PROOF_VERIFIED, PROOF_FAILED or PROOF_UNAVAILABLE (not
        anchored yet, not received here, no answer within ``timeout``). Blocks: never call
        it from a callback."""
        if self.verifier is None:
            raise ConfigError("request_proof needs verification (registry and chain_reader)")
        worker = self._verification.thread
        if threading.current_thread() in (worker, getattr(self._mqtt, "_thread", None)):
            raise ConfigError("request_proof blocks: do not call it from a callback")
        return self._verification.request_proof(topic, device, sequence, timeout)

    def pending_proofs(self) -> int:
        """Sampled messages whose proof has not been checked yet."""
        return self._verification.pending_proofs()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the verification worker has handled everything queued so far."""
        if self.verifier is None:
            return True
        done = threading.Event()
        self._verification.submit(done.set)
        return done.wait(timeout)

    def _report_integrity(self, events: Sequence[IntegrityEvent]) -> None:
        if not events:
            return
        with self._lock:
            self._integrity_events += len(events)
        for event in events:
            if not event.ok:
                _log.info("%s: integrity: %s %s", self.client_id, event.kind, event.detail)
        callback = self.on_integrity
        if callback is not None:
            for event in events:
                self._guard(callback, self, event)
