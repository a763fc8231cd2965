"""Helpers shared by the test folders (importable as ``support``: pytest's ``pythonpath``).

One of each: ``enrol`` a participant in the registry, a bounded wait (``eventually``, ``poll``,
``wait_until``), the raw MQTT client (``Client``), and a service loop ``running`` in a task.
"""

from support.clients import Client, Received
from support.enrol import enrol, enrol_raw
from support.polling import eventually, poll, wait_until
from support.tasks import running

__all__ = [
    "Client",
    "Received",
    "enrol",
    "enrol_raw",
    "eventually",
    "poll",
    "running",
    "wait_until",
]
