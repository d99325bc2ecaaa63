"""How an attention runner reaches the FFN side for one step.

The runner's loop is the same in every mode; only the link differs:
- `LocalFFN`: the FFN part lives in the same worker (aggregated serving, the baseline);
- `RemoteFFN`: an FFN worker on the other end of a transport (AFD).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from afdserve.afd.expert_dispatch import Dispatch, ExpertDispatcher
from afdserve.afd.stats import A2F, AFDStats
from afdserve.errors import AfdserveError, TransportTimeout
from afdserve.model.parts import FFNPart
from afdserve.transport.base import Transport
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.staging import to_device


def result_timeout_s(sync_timeout_s: float) -> float:
    """How long an attention worker waits for an FFN result: the FFN may itself wait a whole
    sync timeout for a slow peer before computing, so the attention side allows twice that
    plus a margin; only a dead or wedged FFN takes longer."""
    return 2 * sync_timeout_s + 5.0


RESULT_POLL_S = 0.1
"""With an `interrupted` hook, a wait for an FFN result asks it this often whether to give up."""


class StepInterrupted(AfdserveError):
    """The FFN side is being rebuilt (a dead FFN worker restarted in place): the step in
    flight is abandoned, and run again once this worker's link is connected again."""


class FFNLink(ABC):
    stats: AFDStats
    """This attention worker's AFD metrics (written only by the thread running its step)."""

    @abstractmethod
    def begin_step(
        self, step: int, tokens_per_microbatch: Sequence[int], seq_ids: Sequence[Sequence[int]]
    ) -> None:
        """Announce the step's microbatch sizes (SYNC_REQUEST) before any activation."""

    @abstractmethod
    def submit(self, step: int, layer: int, microbatch: int, h: torch.Tensor) -> None:
        """Hand h [T, D] (attention output plus residual) to the FFN; do not modify h after."""

    @abstractmethod
    def result(self, step: int, layer: int, microbatch: int) -> torch.Tensor:
        """The FFN output y [T, D] for a submitted h; blocks until it is there (with deadline)."""


class LocalFFN(FFNLink):
    """Runs the FFN in place, at submit time."""

    def __init__(self, part: FFNPart) -> None:
        self.part = part
        self._results: dict[tuple[int, int, int], torch.Tensor] = {}
        self.stats = AFDStats()

    def begin_step(self, step, tokens_per_microbatch, seq_ids) -> None:
        self._results.clear()

    def submit(self, step, layer, microbatch, h) -> None:
        self._results[(step, layer, microbatch)] = self.part(layer, h)
        self.stats.record_ffn_batch(layer, microbatch, h.shape[0])

    def result(self, step, layer, microbatch) -> torch.Tensor:
        return self._results.pop((step, layer, microbatch))


class RemoteFFN(FFNLink):
    """Sends activations to the FFN ranks and waits for their results, each wait bounded.

    One FFN rank: every layer's rows go to it whole. Several (rA:mF): `dispatcher` says which
    rows (and, for MoE layers, which expert slots) go to which rank, and puts the answers back
    together (afd/expert_dispatch.py).
    """

    def __init__(
        self,
        transport: Transport,
        ffn_ranks: Sequence[int],
        timeout_s: float,
        device: torch.device | str = "cpu",
        dispatcher: ExpertDispatcher | None = None,
    ) -> None:
        self.transport, self.timeout_s = transport, timeout_s
        self.ffn_ranks = tuple(ffn_ranks)
        if len(self.ffn_ranks) > 1 and dispatcher is None:
            raise ValueError("several FFN ranks need a dispatcher")
        self.dispatcher = dispatcher if len(self.ffn_ranks) > 1 else None
        self.device = torch.device(device)
        """Where results go: a host transport delivers them in host memory."""
        self.stats = AFDStats()
        self._pending: dict[tuple[int, int, int], tuple[Dispatch, torch.Tensor]] = {}
        self.interrupted: Callable[[], bool] | None = None
        """Asked every RESULT_POLL_S while a result is late: True abandons the step
        (StepInterrupted). A worker process answers it from its control socket (launch/worker.py:
        the front's `Rejoin`)."""

    def begin_step(self, step, tokens_per_microbatch, seq_ids) -> None:
        sync = SyncInfo(tuple(tokens_per_microbatch), tuple(tuple(s) for s in seq_ids))
        self._pending.clear()
        for rank in self._live_ranks():
            msg = Message(MsgType.SYNC_REQUEST, step, sender=self.transport.rank, sync=sync)
            self._send_or_await_rejoin(rank, msg, step, 0)

    def submit(self, step, layer, microbatch, h) -> None:
        if self.dispatcher is None:
            self._send(self.ffn_ranks[0], MsgType.ACTIVATION_TRANSFER, step, layer, microbatch, h)
            return
        sends, dispatch = self.dispatcher.plan(layer, h)
        live = set(self.dispatcher.live)
        for w, (rank, out) in enumerate(zip(self.ffn_ranks, sends, strict=True)):
            if w not in live:
                continue  # down (an FFN failover): it is sent nothing
            if out.routing is not None and out.expects_reply:
                self._send(rank, MsgType.ROUTING, step, layer, microbatch, out.routing)
            self._send(rank, MsgType.ACTIVATION_TRANSFER, step, layer, microbatch, out.x)
        self._pending[(step, layer, microbatch)] = (dispatch, h)

    def _live_ranks(self) -> tuple[int, ...]:
        """The FFN ranks in service (all of them unless the placement says some are down)."""
        if self.dispatcher is None:
            return self.ffn_ranks
        return tuple(self.ffn_ranks[w] for w in self.dispatcher.live)

    def _send(self, rank, type_, step, layer, microbatch, t) -> None:
        msg = Message(type_, step, layer, microbatch, self.transport.rank, tensor=t)
        t0 = time.perf_counter()
        self._send_or_await_rejoin(rank, msg, step, layer)
        self.stats.record_transfer(A2F, layer, time.perf_counter() - t0, t.nbytes)

    def _send_or_await_rejoin(self, rank: int, msg: Message, step: int, layer: int) -> None:
        """Every send of a step, the step's sync included: a dead FFN worker (PeerUnreachable,
        a TransportTimeout) waits for the front's Rejoin, not kills this worker; a worker
        killed between steps is met by the next step's first send."""
        try:
            self.transport.send(rank, msg)
        except TransportTimeout:  # the FFN worker died, stalled or is rejoining
            self._await_rejoin(step, layer)
            raise

    def _await_rejoin(self, step: int, layer: int) -> None:
        """After a send failed: wait (up to the result timeout) for the front to say the FFN
        side is being rebuilt, which a dead FFN worker means (StepInterrupted then); returns
        when it does not say so, and the caller's error stands."""
        if self.interrupted is None:
            return
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.interrupted():
                raise StepInterrupted(
                    f"step {step} abandoned at layer {layer} (the FFN side is rebuilt)"
                ) from None
            time.sleep(RESULT_POLL_S)

    def result(self, step, layer, microbatch) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        if self.dispatcher is None:
            return self._recv(self.ffn_ranks[0], step, layer, microbatch, deadline)
        dispatch, h = self._pending.pop((step, layer, microbatch))
        replies = [
            self._recv(rank, step, layer, microbatch, deadline) if place.numel() else None
            for rank, place in zip(self.ffn_ranks, dispatch.places, strict=True)
        ]
        return self.dispatcher.gather(dispatch, replies, h)  # [T, D]

    def _recv(self, rank, step, layer, microbatch, deadline) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            while True:
                until = deadline
                if self.interrupted is not None:
                    until = min(deadline, time.monotonic() + RESULT_POLL_S)
                try:
                    msg = self.transport.recv(
                        rank,
                        MsgType.ACTIVATION_RESULT,
                        step,
                        layer,
                        microbatch,
                        timeout_s=max(0.0, until - time.monotonic()),
                    )
                    break
                except TransportTimeout:
                    if until >= deadline:
                        self.stats.record_sync_timeout()
                        raise
                    if self.interrupted is not None and self.interrupted():
                        raise StepInterrupted(
                            f"step {step} abandoned at layer {layer} (the FFN side is rebuilt)"
                        ) from None
        finally:
            self.stats.add_idle(time.perf_counter() - t0)  # blocked on the FFN: this worker idles
        assert msg.tensor is not None
        return to_device(msg.tensor, self.device)  # [T, D]; no copy when it is there already
