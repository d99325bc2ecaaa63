"""Shutting down on SIGTERM or Ctrl-C without cutting streams silently: drain, then exit.

uvicorn alone stops listening at the first signal, waits a fixed time for connections, then
cancels the tasks still answering, so a stream longer than that ends mid-way with neither an
error nor `[DONE]`. `DrainingServer` replaces that first step: at the first signal the server
keeps listening but answers every new request 503 (and /health 503, so a load balancer stops
sending), the engine keeps stepping while the requests in flight finish, for up to
`--shutdown-timeout` seconds (vLLM's flag; `--drain-timeout` is the same); then the requests
still running are cut, each with a 503 (streams: an error event, then `data: [DONE]`), and
only then does uvicorn's own shutdown run, with nothing left to cancel. A second signal cuts
at once. A timeout of 0 cuts at the first signal (vLLM's default; afdserve's is 5 s).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from afdserve.server.async_engine import AsyncEngine
from afdserve.server.state import DEFAULT_SHUTDOWN_TIMEOUT_S

log = logging.getLogger("afdserve.server")

FAILED_GRACE_S = 2.0
"""How long a server whose engine failed for good still answers (503s, the cut streams' error
events) before it shuts down."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains `engine` before shutting down.

    `handle_exit` is uvicorn's signal handler (installed in the main thread only); called
    from any thread, as tests do, it starts the same drain."""

    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncEngine,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        exit_on_failure: bool = False,
    ) -> None:
        if not shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {shutdown_timeout_s}")
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cut_now: asyncio.Event | None = None
        self._drain_asked = False
        self._drain: asyncio.Task | None = None
        self.cut: int | None = None
        """Requests the drain cut (None until a drain has finished)."""
        self.exit_on_failure = exit_on_failure
        """Shut down FAILED_GRACE_S after the engine failed for good (`afdserve serve`, which
        then exits with ENGINE_FAILED for its supervisor to restart it), rather than answer
        503 for ever."""
        self._failed_at: float | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.exit_on_failure and self.engine.error is not None and not self.should_exit:
            now = time.monotonic()
            if self._failed_at is None:
                self._failed_at = now
                log.error("the engine failed for good; shutting down in %.0fs", FAILED_GRACE_S)
            elif now - self._failed_at > FAILED_GRACE_S:
                self.should_exit = True
        return await super().on_tick(counter)

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._cut_now = asyncio.Event()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then uvicorn's shutdown; second: cut now. (A signal handler:
        it only hands work to the loop.)"""
        loop, cut_now = self._loop, self._cut_now
        if loop is None or cut_now is None or loop.is_closed() or self.should_exit:
            super().handle_exit(sig, frame)  # not serving yet, or shutting down already
            return
        if self._drain_asked:
            loop.call_soon_threadsafe(self._cut_at_once, sig)
            return
        self._drain_asked = True
        loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        log.info("%s: draining (new requests get 503; a second signal cuts now)", _name(sig))
        self._drain = asyncio.ensure_future(self._drain_then_exit(sig))

    def _cut_at_once(self, sig: int) -> None:
        log.warning("second %s: cutting the requests in flight now", _name(sig))
        assert self._cut_now is not None
        self._cut_now.set()

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            self.cut = await self.engine.drain(self.shutdown_timeout_s, self._cut_now)
        except Exception:  # noqa: BLE001 - whatever happened, the server must still exit
            log.exception("drain failed; shutting down")
        finally:
            super().handle_exit(sig, None)  # uvicorn's own shutdown, which re-raises `sig`


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
