"""The FFN worker: stateless, one loop, gathers every attention worker's activations per
(step, layer, microbatch) into one batch, runs the FFN once, and splits the result back.

Legend: T_k = tokens from attention worker k, T = sum over k, D = hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from afdserve.model.parts import FFNPart
from afdserve.transport.base import Transport
from afdserve.transport.protocol import Message, MsgType, SyncInfo

log = logging.getLogger(__name__)


class FFNWorker:
    def __init__(self, part: FFNPart, transport: Transport, attention_ranks: Sequence[int], timeout_s: float) -> None:
        self.part = part
        self.transport = transport
        self.attention_ranks = tuple(attention_ranks)
        self.timeout_s = timeout_s
        self.num_layers = part.config.num_hidden_layers
        self.last_batch_tokens: list[int] = []  # per (layer, microbatch) of the last step, for metrics

    def serve_step(self, step: int) -> None:
        """Serve one step of every attention worker: SYNC first, then all layers x microbatches."""
        syncs: dict[int, SyncInfo] = {}
        for rank in self.attention_ranks:
            msg = self.transport.recv(rank, MsgType.SYNC_REQUEST, step, timeout_s=self.timeout_s)
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
            msg = self.transport.recv(rank, MsgType.ACTIVATION_TRANSFER, step, layer, mb, timeout_s=self.timeout_s)
            assert msg.tensor is not None
            if msg.tensor.shape[0] != n_tokens:
                log.warning("rank %d sent %d tokens for (%d, %d, %d), SYNC said %d",
                            rank, msg.tensor.shape[0], step, layer, mb, n_tokens)
            hs.append(msg.tensor)
        h = hs[0] if len(hs) == 1 else torch.cat(hs)  # [T, D]
        y = self.part(layer, h)  # [T, D]
        self.last_batch_tokens.append(h.shape[0])
        for (rank, _), y_k in zip(senders, torch.split(y, [t.shape[0] for t in hs]), strict=True):
            out = Message(MsgType.ACTIVATION_RESULT, step, layer, mb, self.transport.rank, tensor=y_k)
            self.transport.send(rank, out)
