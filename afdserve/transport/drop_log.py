"""Counting and rate-limited logging of input a receiver drops.

A receiver drops a malformed frame and keeps serving; it says so in the log, because a dropped
frame is what a misconfigured or buggy peer, or someone probing the port, looks like. But whoever
can send garbage can send a lot of it, and one log line per frame would let them fill the disk
and slow the receiver down. So the first `burst` drops of every `window_s` are logged in full,
the rest only counted, and the next window opens with one line saying how many went unlogged.
The count itself (`Transport.dropped_frames`) is exact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class DropLog:
    """Counts drops, logging at most `burst` of them per `window_s` seconds. Thread-safe (the
    torch transport drops from one receiver thread per peer)."""

    def __init__(
        self,
        logger: logging.Logger,
        prefix: str,
        *,
        what: str = "dropped a bad frame",
        burst: int = 10,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._prefix = prefix
        self._what = what
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -float("inf")
        self._logged = 0
        self._unlogged = 0
        self.count = 0

    def record(self, why: str, exc: BaseException | None = None) -> bool:
        """Count one drop and log it unless this window's burst is spent; True if logged.

        `exc`: an unexpected error (a bug rather than bad input), logged with its traceback at
        ERROR; plain malformed input goes at WARNING."""
        with self._lock:
            self.count += 1
            now = self._clock()
            if now - self._window_start >= self._window_s:
                if self._unlogged:
                    self._log.warning(
                        "%s: %d more times %s, not logged, in the last %.0f s",
                        self._prefix,
                        self._unlogged,
                        self._what,
                        now - self._window_start,
                    )
                self._window_start, self._logged, self._unlogged = now, 0, 0
            if self._logged >= self._burst:
                self._unlogged += 1
                return False
            self._logged += 1
            last = self._logged == self._burst
        suffix = f" (at most {self._burst} such lines per {self._window_s:.0f} s)" if last else ""
        if exc is None:
            self._log.warning("%s %s %s%s", self._prefix, self._what, why, suffix)
        else:
            self._log.error(
                "%s %s %s: failed to handle it%s", self._prefix, self._what, why, suffix,
                exc_info=(type(exc), exc, exc.__traceback__),
            )  # fmt: skip
        return True
