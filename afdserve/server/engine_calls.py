"""EngineCalls: the engine's blocking calls (add a request, abort one, read its state), run on a
few threads of their own instead of on the event loop.

Why: the engine behind the server may be the front of worker processes, whose `add_request`
and `abort` send a control message with a deadline (up to 1 s per add to a worker that stopped
reading, 0.2 s per abort) under the engine's lock, and whose `state()` waits for that lock. On
the event loop each of those waits would stall every stream, /health and /metrics; here they
stall only the call that made them.

Bounds: `THREADS` threads; a call waits in their queue only behind calls of requests in flight
(each request makes one add and at most one abort), so the queue is as bounded as the requests
the server admits. A call whose awaiting coroutine is cancelled still runs to its end on its
thread: `run`'s `on_orphan` is then called there with the result, so that an add nobody will
read is undone (aborted) rather than left holding KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("afdserve.server")

T = TypeVar("T")

THREADS = 4
"""Engine calls at once: admissions are serialised anyway (AsyncEngine's admission lock), so
the others are aborts and scrapes, which must not queue behind a slow add."""


class EngineCalls:
    """A small thread pool for the engine's blocking calls; `close()` stops taking new ones."""

    def __init__(self, threads: int = THREADS) -> None:
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="afdserve-engine-call")
        self._closed = False

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        on_orphan: Callable[[T], None] | None = None,
    ) -> T:
        """`fn(*args)` on a pool thread, awaited. If the awaiting task is cancelled after the
        call started, `on_orphan(result)` runs once the call succeeds (on its thread)."""
        future = self._pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if on_orphan is not None:
                future.add_done_callback(_orphaned(on_orphan))
            raise

    def fire(self, fn: Callable[..., Any], *args: Any) -> None:
        """`fn(*args)` on a pool thread, not awaited (an abort: nobody waits for it); an error
        is logged. After `close()` the call is dropped: the engine is closed, nothing to undo."""
        if self._closed:
            return
        try:
            future = self._pool.submit(fn, *args)
        except RuntimeError:  # shut down between the check and the submit
            return
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        """Drop calls not started yet; those running finish on their own (each is bounded)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _orphaned(on_orphan: Callable[[Any], None]) -> Callable[[Future], None]:
    def done(future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # never ran, or failed: nothing was added
        try:
            on_orphan(future.result())
        except Exception:  # noqa: BLE001 - a clean-up on a pool thread: log, never raise
            log.exception("undoing an engine call whose caller went away failed")

    return done


def _log_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("engine call failed: %r", future.exception())
