"""The FFN worker: stateless, one loop, gathers every attention worker's activations per
(step, layer, microbatch) into one batch, runs the FFN once, and splits the result back.

Legend: T_k = tokens from attention worker k, T = sum over k, D = hidden size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from afdserve.afd.stats import F2A, AFDStats
from afdserve.errors import TransportTimeout
from afdserve.model.parts import FFNPart
from afdserve.transport.base import Transport
from afdserve.transport.protocol import Message, MsgType, SyncInfo

log = logging.getLogger(__name__)


class FFNWorker:
    def __init__(
        self, part: FFNPart, transport: Transport, attention_ranks: Sequence[int], timeout_s: float
    ) -> None:
        self.part = part
        self.transport = transport
        self.attention_ranks = tuple(attention_ranks)
        self.timeout_s = timeout_s
        self.num_layers = part.config.num_hidden_layers
        self.last_batch_tokens: list[
            int
        ] = []  # per (layer, microbatch) of the last step, for metrics
        self.stats = AFDStats()
        """AFD metrics of this worker (written only by the thread running serve_step)."""

    def serve_step(self, step: int) -> None:
        """Serve one step of every attention worker: SYNC first, then all layers x microbatches."""
        t0 = time.perf_counter()
        try:
            self._serve_step(step)
        finally:
            self.stats.add_active(time.perf_counter() - t0)

    def _recv(self, rank: int, type_: MsgType, step: int, layer: int = 0, mb: int = 0) -> Message:
        t0 = time.perf_counter()
        try:
            msg = self.transport.recv(rank, type_, step, layer, mb, timeout_s=self.timeout_s)
        except TransportTimeout:
            self.stats.record_sync_timeout()
            raise
        finally:
            self.stats.add_idle(time.perf_counter() - t0)  # blocked on an attention worker
        return msg

    def _serve_step(self, step: int) -> None:
        syncs: dict[int, SyncInfo] = {}
        for rank in self.attention_ranks:
            msg = self._recv(rank, MsgType.SYNC_REQUEST, step)
            assert msg.sync is not None
            syncs[rank] = msg.sync
        num_mb = max((s.num_microbatches for s in syncs.values()), default=0)
        self.last_batch_tokens = []
        for layer in range(self.num_layers):
            for mb in range(num_mb):
                senders = [
                    (r, s.tokens_per_microbatch[mb])
                    for r, s in syncs.items()
                    if mb < s.num_microbatches and s.tokens_per_microbatch[mb] > 0
                ]
                if senders:
                    self._serve(step, layer, mb, senders)

    def _serve(self, step: int, layer: int, mb: int, senders: list[tuple[int, int]]) -> None:
        hs = []
        for rank, n_tokens in senders:
            msg = self._recv(rank, MsgType.ACTIVATION_TRANSFER, step, layer, mb)
            assert msg.tensor is not None
            if msg.tensor.shape[0] != n_tokens:
                log.warning(
                    "rank %d sent %d tokens for (%d, %d, %d), SYNC said %d",
                    rank,
                    msg.tensor.shape[0],
                    step,
                    layer,
                    mb,
                    n_tokens,
                )
            hs.append(msg.tensor)
        h = hs[0] if len(hs) == 1 else torch.cat(hs)  # [T, D]
        y = self.part(layer, h)  # [T, D]
        self.last_batch_tokens.append(h.shape[0])
        self.stats.record_ffn_batch(layer, mb, h.shape[0])
        for (rank, _), y_k in zip(senders, torch.split(y, [t.shape[0] for t in hs]), strict=True):
            out = Message(
                MsgType.ACTIVATION_RESULT, step, layer, mb, self.transport.rank, tensor=y_k
            )
            t0 = time.perf_counter()
            self.transport.send(rank, out)
            self.stats.record_transfer(F2A, layer, time.perf_counter() - t0, y_k.nbytes)
