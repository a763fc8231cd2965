"""The voucher intake's commit linger (broker/_commit_linger.py) on its own: when a queued
voucher is due, and the bound on the pace record a client's vouchers fill."""

from __future__ import annotations

import asyncio
import os

from blendsm.broker._commit_linger import _MAX_PACES, CommitLinger


def _linger(spare: float = 0.01) -> CommitLinger:
    return CommitLinger(lambda: spare)


def test_a_channels_first_voucher_may_linger_the_whole_setting() -> None:
    linger = _linger(0.01)
    linger.arrived(b"a" * 32, 100.0, awaited=False)
    assert linger._first_due == 100.01


def test_a_fast_channels_next_voucher_lingers_a_quarter_of_its_pace() -> None:
    linger = _linger(0.01)
    linger.arrived(b"a" * 32, 100.0, awaited=False)
    linger.taken()
    linger.arrived(b"a" * 32, 100.02, awaited=False)  # 20 ms after the previous one
    assert abs(linger._first_due - 100.025) < 1e-9  # 5 ms, not the 10 ms setting
    linger.taken()
    linger.arrived(b"a" * 32, 101.02, awaited=False)  # 1 s after: the setting caps it
    assert abs(linger._first_due - 101.03) < 1e-9


def test_an_awaited_voucher_is_due_at_once_until_the_batch_is_taken() -> None:
    linger = _linger(0.5)
    linger.arrived(b"a" * 32, 100.0, awaited=False)
    linger.arrived(b"b" * 32, 100.1, awaited=True)
    linger.arrived(b"c" * 32, 100.2, awaited=False)  # a later one does not undo it
    assert linger._first_due < 0
    linger.taken()
    linger.arrived(b"c" * 32, 100.3, awaited=False)
    assert linger._first_due > 100


def test_the_pace_record_is_bounded_whatever_channels_vouchers_name() -> None:
    linger = _linger()
    for i in range(_MAX_PACES + 10):
        linger.arrived(os.urandom(32), float(i), awaited=False)
        linger.taken()
    assert len(linger._last_arrival) <= _MAX_PACES


async def test_wait_returns_when_due_and_end_cuts_it_short() -> None:
    loop = asyncio.get_running_loop()
    linger = _linger(0.05)
    linger.arrived(b"a" * 32, loop.time(), awaited=False)
    started = loop.time()
    await asyncio.wait_for(linger.wait(), 2.0)
    assert loop.time() - started >= 0.04  # waited until due
    linger.taken()
    linger = _linger(5.0)
    linger.arrived(b"a" * 32, loop.time(), awaited=False)
    waiting = asyncio.ensure_future(linger.wait())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    linger.end()
    await asyncio.wait_for(waiting, 1.0)  # not the 5 s
