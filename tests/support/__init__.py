"""Helpers shared by the test folders (importable as ``support``: pytest's ``pythonpath``).

One of each: ``enrol`` a participant in the registry, a bounded wait (``eventually``, ``poll``,
``wait_until``), the MQTT test client (``Client``), raw-socket packets (``connect_packet``,
``oversized_publish``, ``seconds_until_closed``), a service loop ``running`` in a task, and TEST-ONLY
certificates (``TestCA``), read-only looks into a broker's SQLite stores and the chain events
they must match (``stored_voucher``, ``anchored_sequences``, ``claim_logs``...).
"""

from support.certs import Issued, TestCA
from support.clients import Client, Received
from support.enrol import enrol, enrol_raw
from support.polling import eventually, poll, wait_until
from support.raw import (
    RawPacket,
    ack_packet,
    connect_packet,
    oversized_publish,
    publish_packet,
    read_packet,
    remaining_length,
    seconds_until_closed,
    subscribe_packet,
)
from support.stores import (
    anchor_logs,
    anchored_sequences,
    claim_logs,
    confirmed_batches,
    confirmed_claims,
    leaf_sequences,
    leaf_times,
    open_claims,
    stored_delivered,
    stored_voucher,
)
from support.tasks import running, tasks_started

__all__ = [
    "Client",
    "Issued",
    "RawPacket",
    "Received",
    "TestCA",
    "ack_packet",
    "anchor_logs",
    "anchored_sequences",
    "claim_logs",
    "confirmed_batches",
    "confirmed_claims",
    "connect_packet",
    "enrol",
    "enrol_raw",
    "eventually",
    "leaf_sequences",
    "leaf_times",
    "open_claims",
    "oversized_publish",
    "poll",
    "publish_packet",
    "read_packet",
    "remaining_length",
    "running",
    "seconds_until_closed",
    "stored_delivered",
    "stored_voucher",
    "subscribe_packet",
    "tasks_started",
    "wait_until",
]
