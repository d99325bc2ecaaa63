"""Caller-driven progress for transports whose arrivals must be pulled (socket reads, NIXL polls).

Whoever waits drives progress: a thread blocked in `recv` (or a send waiting for ring space)
reads the backend itself, so a reply reaches it without a hand-off between threads. Measured on
the 2-core dev box, a Unix-datagram ping-pong took 14 us per round trip when the waiting thread
read the socket itself and 64 us when a receiver thread read it and woke the waiter through a
condition variable. A daemon pump thread reads while nobody waits, so FREEs, heartbeats and
early activations are still taken in while the worker computes; it parks while callers wait.

Backends implement `_drain` (process everything available now, never block) and `_fds` (file
descriptors that become readable when input may be waiting; none means "poll by sleeping").
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from afdserve.errors import TransportClosed, TransportTimeout
from afdserve.transport.base import Key, PeerUnreachable, Transport, _describe, make_key
from afdserve.transport.message import Message, MsgType

log = logging.getLogger(__name__)
T = TypeVar("T")

_SAFETY_WAIT_S = 0.02
"""Longest a waiting caller sleeps in select before re-checking (only matters in rare races)."""
_PUMP_IDLE_WAIT_S = 0.05
"""The pump thread's select timeout while idle (it wakes at once on input or close)."""
_PEER_CHECK_S = 0.2
"""How often a long recv asks the backend whether its peer is still there."""
_PUMP_GRACE_S = 0.002
"""The pump thread stays parked until no caller has waited for this long: in a tight
send/recv loop it would otherwise wake after every recv and fight the caller for the GIL."""
_PUMP_REPORT_S = 10.0
"""A pump thread whose drain keeps failing logs the traceback at most this often."""


class PumpedTransport(Transport):
    """A Transport whose input is pulled by `_drain`, from waiting callers or a pump thread."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self._pump_lock = threading.Lock()  # serialises _drain: one reader of the backend at a time
        self._state = threading.Condition(threading.Lock())  # guards _waiters/_closed; the pump
        # thread parks on it (a plain Lock: cheaper to take than the default RLock)
        self._progress = threading.Condition()  # callers that could not pump wait here for others
        self._waiters = 0
        self._progress_waiters = 0
        self._last_wait_end = 0.0
        self.spin_s = 0.0
        """How long a waiting caller polls the backend before sleeping in select (0: never spins)."""
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    # -- backend hooks ------------------------------------------------------------------------

    @abstractmethod
    def _drain(self) -> int:
        """Process all input available now without blocking; return how many events it handled.

        Called with the pump lock held. Malformed input is logged and dropped here.
        """

    def _drain_for(self, key: Key) -> int:
        """`_drain` for a caller waiting on `key`: a backend may stop once that message is in
        the mailbox and leave the rest queued for the next drain (the default drains it all)."""
        return self._drain()

    def _fds(self) -> Sequence[int]:
        """File descriptors that turn readable when `_drain` may find input (empty: sleep-poll)."""
        return ()

    def _close_backend(self) -> None:
        """Release sockets, buffers and peers; called once, with the pump lock held."""

    def _peer_gone(self, peer: int) -> str | None:
        """Why `peer` is known to be gone (recv then raises PeerUnreachable early), else None."""
        return None

    # -- progress -----------------------------------------------------------------------------

    def _start_pump(self, name: str) -> None:
        self._thread = threading.Thread(target=self._pump_loop, name=name, daemon=True)
        self._thread.start()

    def _wait_for(
        self,
        pred: Callable[[], T | None],
        deadline: float,
        *,
        key: Key | None = None,
        drained: bool = False,
    ) -> T | None:
        """Drive progress until `pred()` returns something other than None, or the deadline.

        Returns pred's value, or None at the deadline; raises TransportClosed if closed
        meanwhile. With `key` (a recv waiting for that message): drains with `_drain_for(key)`
        and every _PEER_CHECK_S asks whether the sender is gone (PeerUnreachable). `drained`:
        the caller just found the backend empty, so the first round goes straight to spinning
        or sleeping (input that lands meanwhile makes the select return at once).
        """
        value = pred()
        if value is not None:
            return value
        with self._state:
            self._waiters += 1
        pump = self._pump_lock
        drain = self._drain if key is None else lambda: self._drain_for(key)
        now = time.monotonic()
        spin_until = now + self.spin_s
        next_check = now + _PEER_CHECK_S if key is not None else math.inf
        idle_rounds = 0
        try:
            while True:
                if self._closed:
                    raise TransportClosed(
                        f"rank {self.rank}: transport closed while waiting"
                        + (f" for {_describe(key)}" if key is not None else "")
                    )
                now = time.monotonic()
                if now >= next_check and key is not None:
                    next_check = now + _PEER_CHECK_S
                    why = self._peer_gone(key[0])
                    if why is not None:
                        value = pred()  # it may have come in just before
                        if value is not None:
                            return value
                        raise PeerUnreachable(
                            f"rank {self.rank}: rank {key[0]} is gone ({why}) while waiting "
                            f"for {_describe(key)}"
                        )
                remaining = deadline - now
                if remaining <= 0:
                    return None
                if drained:
                    drained = handled = False
                elif pump.acquire(blocking=False):
                    try:
                        handled = drain()
                    finally:
                        pump.release()
                    if handled:
                        idle_rounds = 0
                        self._handed_over(1)
                else:  # another thread is pumping; it notifies when it handled something
                    self._wait_progress(min(remaining, 0.001))
                    handled = True  # look at pred, then pump again
                # another thread's drain may have put what we wait for in place (and woken us
                # through the pipe): look before spinning or sleeping again
                value = pred()
                if value is not None:
                    return value
                if not handled:
                    if now < spin_until:
                        continue  # a reply often comes within microseconds: skip the sleep/wake
                    self._wait_ready(min(remaining, _SAFETY_WAIT_S), idle_rounds)
                    idle_rounds += 1
        finally:
            self._end_wait()

    def _end_wait(self) -> None:
        with self._state:
            self._waiters -= 1
            self._last_wait_end = time.monotonic()

    def _wait_progress(self, timeout_s: float) -> None:
        with self._progress:
            self._progress_waiters += 1
            try:
                self._progress.wait(timeout_s)
            finally:
                self._progress_waiters -= 1

    def _handed_over(self, me: int) -> None:
        """After a drain that handled input: wake the threads that may wait for what it put in
        the mailbox (`me`: 1 if the caller counts among the waiters). Callers that could not
        pump wait on _progress; other waiters may sit in select, where only the wake pipe
        reaches them, since the socket input they wait for is no longer there."""
        if self._progress_waiters:
            self._notify_progress()
        if self._waiters > me:
            self._wake()

    def _notify_progress(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def _wait_ready(self, timeout_s: float, idle_rounds: int) -> None:
        """Block until input may be there (fd readable, or a poll interval passed)."""
        fds = self._fds()
        if not fds:  # nothing to select on: spin briefly, then back off up to 0.5 ms
            if idle_rounds < 20:
                time.sleep(0)
            else:
                time.sleep(min(timeout_s, 20e-6 * (1 << min(idle_rounds - 20, 5))))
            return
        wake_r = self._wake_r
        try:
            ready, _, _ = select.select([*fds, wake_r] if wake_r >= 0 else fds, [], [], timeout_s)
        except (OSError, ValueError):  # an fd was closed under us: close() is running
            if not self._closed:
                raise
            return
        if wake_r >= 0 and wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except (BlockingIOError, OSError):
                pass

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # pipe full (a wake is pending anyway) or closed
            pass

    def _pump_loop(self) -> None:
        idle_rounds = 0
        failures, last_report = 0, -math.inf
        while True:
            with self._state:
                while not self._closed:
                    idle = time.monotonic() - self._last_wait_end
                    if not self._waiters and idle >= _PUMP_GRACE_S:
                        break
                    self._state.wait(max(_PUMP_GRACE_S - idle, _PUMP_GRACE_S / 2))
                if self._closed:
                    return
            self._wait_ready(_PUMP_IDLE_WAIT_S, max(idle_rounds, 20))
            if self._waiters or self._closed:
                continue
            try:
                with self._pump_lock:
                    if self._closed:
                        return
                    handled = self._drain()
            except Exception:  # a bug in a backend: keep serving, but do not spin on it
                # (malformed input never gets here: backends drop it frame by frame)
                failures += 1
                if time.monotonic() - last_report >= _PUMP_REPORT_S:
                    log.exception(
                        "rank %d: transport pump failed (%d times since the last report); "
                        "continuing", self.rank, failures,
                    )  # fmt: skip
                    failures, last_report = 0, time.monotonic()
                time.sleep(0.01)
                continue
            if handled:
                idle_rounds = 0
                self._notify_progress()
                if self._waiters:  # a caller began waiting while we drained: it may sit in select
                    self._wake()
            else:
                idle_rounds += 1

    # -- Transport API --------------------------------------------------------------------------

    def recv(
        self,
        src: int,
        type_: MsgType,
        step: int,
        layer: int = 0,
        microbatch: int = 0,
        *,
        timeout_s: float,
    ) -> Message:
        key = (src, int(type_), step, layer, microbatch)  # make_key
        try_take = self.mailbox.try_take
        msg = try_take(key)
        if msg is not None:
            return msg
        if self._closed:
            raise TransportClosed(
                f"rank {self.rank}: transport closed while waiting for {_describe(key)}"
            )
        # Pull whatever has arrived before counting as a waiter: a reply that is already in the
        # backend costs one drain, not the waiter bookkeeping.
        pump = self._pump_lock
        drained = False
        if pump.acquire(blocking=False):
            try:
                handled = self._drain_for(key)
            finally:
                pump.release()
            if handled:
                self._handed_over(0)
                msg = try_take(key)
                if msg is not None:
                    return msg
            else:
                drained = True
        msg = self._wait_for(
            lambda: try_take(key), time.monotonic() + max(timeout_s, 0.0), key=key, drained=drained
        )
        if msg is None:
            raise TransportTimeout(
                f"rank {self.rank}: timed out after {timeout_s:.3f}s waiting for {_describe(key)}"
            )
        return msg

    def poll(
        self, src: int, type_: MsgType, step: int, layer: int = 0, microbatch: int = 0
    ) -> bool:
        """True if the keyed message has arrived (pulls pending input first, without waiting)."""
        key = make_key(src, type_, step, layer, microbatch)
        if (
            not self.mailbox.has(key)
            and not self._closed
            and self._pump_lock.acquire(blocking=False)
        ):
            try:
                handled = self._drain()
            finally:
                self._pump_lock.release()
            if handled:
                self._handed_over(0)
        return self.mailbox.has(key)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the pump thread, wake every waiter (TransportClosed), release the backend.

        Idempotent; safe to call from any thread but the pump thread itself.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.notify_all()
        self.mailbox.close()
        self._wake()
        self._notify_progress()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("rank %d: transport pump thread did not stop within 5 s", self.rank)
        with self._pump_lock:
            try:
                self._close_backend()
            finally:
                self._close_wake_pipe()

    def _abandon(self) -> None:
        """For a constructor that failed after this base was set up: mark the endpoint closed
        and release what the base holds (the backend releases its own resources)."""
        self._closed = True
        self.mailbox.close()
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"rank {self.rank}: transport is closed")
