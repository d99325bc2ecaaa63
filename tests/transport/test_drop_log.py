"""Dropped frames are counted exactly and logged at most `burst` times per window, with one
line per window saying how many went unlogged (a garbage flood cannot flood the log)."""

from __future__ import annotations

import logging

from afdserve.transport.drop_log import DropLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_drops_are_counted_exactly_and_logged_in_bursts(caplog):
    clock = Clock()
    log = logging.getLogger("test.drop_log")
    drops = DropLog(log, "tcp rank 1", burst=3, window_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.drop_log"):
        logged = [drops.record(f"#{i}") for i in range(50)]
        assert logged == [True] * 3 + [False] * 47
        assert [r.getMessage() for r in caplog.records][:1] == ["tcp rank 1 dropped a bad frame #0"]
        assert "at most 3 such lines per 10 s" in caplog.records[2].getMessage()
        assert len(caplog.records) == 3
        clock.t += 10.0  # a new window: the count of the unlogged ones, then a fresh burst
        assert drops.record("#50")
        messages = [r.getMessage() for r in caplog.records[3:]]
        assert messages == [
            "tcp rank 1: 47 more times dropped a bad frame, not logged, in the last 10 s",
            "tcp rank 1 dropped a bad frame #50",
        ]
    assert drops.count == 51


def test_an_unexpected_error_is_logged_with_its_traceback(caplog):
    drops = DropLog(logging.getLogger("test.drop_log"), "shm rank 0", clock=Clock())
    try:
        raise RuntimeError("bug")
    except RuntimeError as e:
        err = e
    with caplog.at_level(logging.WARNING, logger="test.drop_log"):
        drops.record("from rank 1", err)
    (rec,) = caplog.records
    assert rec.levelno == logging.ERROR and rec.exc_info[1] is err
    assert rec.getMessage() == "shm rank 0 dropped a bad frame from rank 1: failed to handle it"
