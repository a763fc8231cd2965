"""Helpers shared by the test folders (importable as ``support``: pytest's ``pythonpath``).

One of each: ``enrol`` a participant in the registry, a bounded wait, and the raw MQTT client.
"""

from support.clients import Client, Received
from support.enrol import enrol, enrol_raw
from support.polling import eventually, poll, wait_until

__all__ = [
    "Client",
    "Received",
    "enrol",
    "enrol_raw",
    "eventually",
    "poll",
    "wait_until",
]
