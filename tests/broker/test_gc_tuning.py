"""The broker process spaces out full garbage collections (see blendsm.broker._gc_tuning)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from blendsm.broker._gc_tuning import FULL_COLLECTION_EVERY, tune_collector


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


@pytest.mark.usefixtures("thresholds")
def test_full_collections_are_spaced_out_and_never_brought_closer() -> None:
    gc.set_threshold(700, 10, 10)  # CPython's default
    tune_collector()
    assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
    gc.set_threshold(5000, 20, 1000)  # an operator's own, further apart
    tune_collector()
    assert gc.get_threshold() == (5000, 20, 1000)
    gc.set_threshold(0, 10, 10)  # collection off: left off
    tune_collector()
    assert gc.get_threshold() == (0, 10, 10)
