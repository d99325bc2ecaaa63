"""The FFN worker: stateless, one loop. It gathers the activations of every attention worker
that is at the same (layer, microbatch) into one batch, runs that layer's FFN once, and splits
the result back.

Attention workers step independently; each announces a step with SYNC_REQUEST (tokens per
microbatch), after which the FFN expects its activations at the positions (layer, microbatch)
with tokens, in order. The loop serves the earliest position any worker has delivered, waiting
for the other workers at that same position until the sync timeout. A worker that misses it is
marked late: it is never waited on again during that step, and whatever it sends later is served
as it arrives. So one slow attention worker never stalls the others, and a dead one never
deadlocks the FFN. Results do not depend on who was batched with whom (batch-invariant kernels).

Legend: T_k = tokens from attention worker k, T = sum over k, D = hidden size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from afdserve.afd.stats import F2A, AFDStats
from afdserve.errors import TransportTimeout
from afdserve.model.experts import ExpertSet
from afdserve.model.parts import FFNPart
from afdserve.transport.base import Transport, make_key
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.staging import to_device, to_host

log = logging.getLogger(__name__)

GATHER_WAIT_S = 0.5
"""The longest a batch waits (by default) for attention workers at its position whose
activations have not arrived: in a running group they arrive within a layer's attention time
(milliseconds), so a peer that takes longer is stalled, stopped or dead, and waiting the whole
sync timeout for it would freeze every other worker's requests. A peer that misses it is late
for the rest of its step: never waited for again, served as its activations arrive."""

_WAKE_TYPES = frozenset({int(MsgType.SYNC_REQUEST), int(MsgType.ACTIVATION_TRANSFER)})


@dataclass
class _Peer:
    """What the FFN knows of one attention worker's current step."""

    step: int = -1
    positions: list[tuple[int, int]] = field(default_factory=list)
    """(layer, microbatch) still to serve this step, in the order the worker sends them."""
    late: bool = False
    """Missed a sync deadline this step: served as it arrives, never waited for."""

    @property
    def cursor(self) -> tuple[int, int] | None:
        return self.positions[0] if self.positions else None


class FFNWorker:
    def __init__(
        self,
        part: FFNPart,
        transport: Transport,
        attention_ranks: Sequence[int],
        timeout_s: float,
        gather_wait_s: float | None = None,
        experts: Mapping[int, ExpertSet] | None = None,
    ) -> None:
        self.part = part
        self.experts: dict[int, ExpertSet] = dict(experts or {})
        """Expert parallelism (rA:mF): the routed layers and the experts this worker holds in
        each. Their activations come normalised and with a ROUTING table (afd/expert_dispatch.py)
        and get one output row per (token, slot) pair; every other layer runs whole. A
        re-placement swaps in new sets between batches (`use_experts`)."""
        self.transport = transport
        self.timeout_s = timeout_s
        """The sync timeout: a peer at the batch's position that has sent nothing for this long
        is late (served as it arrives for the rest of its step, never waited for)."""
        wait = GATHER_WAIT_S if gather_wait_s is None else gather_wait_s
        self.gather_wait_s = min(wait, timeout_s)
        """How long a batch waits for peers at its position whose activations have not arrived
        yet, to run them together; a peer that misses it is late for the rest of its step. The
        default (GATHER_WAIT_S, at most the sync timeout) gathers the largest FFN batches, as
        AFD on dedicated FFN hardware wants, without letting a stalled peer freeze the others.
        0 serves whoever has arrived: on cores the FFN shares with the attention workers, a
        worker still computing (a long prefill chunk beside another's decode) then does not
        leave the FFN idle."""
        self.num_layers = part.config.num_hidden_layers
        self.hidden_size = part.config.hidden_size
        self.dtype = next(part.parameters()).dtype
        self.device = next(part.parameters()).device
        self.peers = {rank: _Peer() for rank in attention_ranks}
        self.stats = AFDStats()
        """AFD metrics of this worker (written only by the thread running the loop)."""

    def serve_forever(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """The worker loop: serve batches until `stop` is set."""
        while not stop.is_set() and not self.transport.mailbox.closed:
            self.serve_once(poll_s)

    def serve_once(self, wait_s: float) -> bool:
        """Wait up to `wait_s` for work, then serve at most one (layer, microbatch) batch."""
        t0 = time.perf_counter()
        keys = self.transport.mailbox.wait_any(_WAKE_TYPES, wait_s)
        waited = time.perf_counter() - t0
        self._absorb_syncs(keys)
        pos = self._next_position()
        if pos is None:
            if keys:  # activations whose SYNC has not arrived yet: do not spin on them
                time.sleep(0.0002)
            self.stats.add_idle(waited)
            self.stats.add_active(time.perf_counter() - t0)
            return False
        idle = self._serve(pos)
        self.stats.add_idle(waited + idle)
        self.stats.add_active(time.perf_counter() - t0)
        return True

    # -- control --------------------------------------------------------------------------

    def _absorb_syncs(self, keys: list) -> None:
        for key in keys:
            if key[1] != MsgType.SYNC_REQUEST:
                continue
            msg = self.transport.mailbox.try_take(key)
            peer = self.peers.get(msg.sender) if msg else None
            if peer is None or msg.sync is None:
                log.warning("dropping SYNC_REQUEST from unknown rank %s", key[0])
                continue
            if msg.step <= peer.step:
                log.warning(
                    "rank %d: stale SYNC for step %d (at %d), dropped",
                    msg.sender,
                    msg.step,
                    peer.step,
                )
                continue
            if peer.positions:
                log.warning(
                    "rank %d started step %d with %d positions of step %d unserved",
                    msg.sender,
                    msg.step,
                    len(peer.positions),
                    peer.step,
                )
            peer.step, peer.late = msg.step, False
            peer.positions = _positions(msg.sync, self.num_layers)
            self.transport.mailbox.drop_older_than_for(msg.sender, msg.step)

    def _next_position(self) -> tuple[int, int] | None:
        ready = [
            p.cursor
            for rank, p in self.peers.items()
            if p.cursor is not None and self._arrived(rank, p)
        ]
        return min(ready) if ready else None

    def _arrived(self, rank: int, peer: _Peer) -> bool:
        layer, mb = peer.cursor
        return self.transport.mailbox.has(
            make_key(rank, MsgType.ACTIVATION_TRANSFER, peer.step, layer, mb)
        )

    # -- one batch ------------------------------------------------------------------------

    def _serve(self, pos: tuple[int, int]) -> float:
        """Gather, compute and answer position `pos`; returns the seconds spent waiting."""
        layer, mb = pos
        members = [
            r
            for r, p in self.peers.items()
            if p.cursor == pos and (not p.late or self._arrived(r, p))
        ]
        gathering = self.gather_wait_s > 0  # missing the window makes one late
        deadline = time.monotonic() + self.gather_wait_s
        waited = 0.0
        batch: list[tuple[int, torch.Tensor]] = []
        for rank in members:
            peer = self.peers[rank]
            t0 = time.perf_counter()
            key = make_key(rank, MsgType.ACTIVATION_TRANSFER, peer.step, layer, mb)
            msg = self.transport.mailbox.take_until(key, deadline)
            waited += time.perf_counter() - t0
            if msg is None and not gathering:
                continue  # not there within the gather window: served in a later batch
            if msg is None:
                peer.late = True
                self.stats.record_sync_timeout()
                log.warning(
                    "rank %d missed the sync deadline at step %d (layer %d, mb %d): now late",
                    rank,
                    peer.step,
                    layer,
                    mb,
                )
                continue
            peer.positions.pop(0)
            h = msg.tensor
            if h is None or h.dim() != 2 or h.shape[1] != self.hidden_size or h.dtype != self.dtype:
                log.warning(
                    "rank %d sent a malformed activation %s for %s: dropped",
                    rank,
                    None if h is None else (tuple(h.shape), h.dtype),
                    pos,
                )
                continue
            if h.shape[0] == 0:
                continue  # nothing of this position is for this worker: no reply expected
            if layer in self.experts:
                routing = self._routing(rank, peer.step, layer, mb, h.shape[0], deadline)
                if routing is None:
                    continue
                h = (h, routing)
            batch.append((rank, h))
        if batch and layer in self.experts:
            self._serve_routed(layer, mb, batch)
        elif batch:
            hs = [t for _, t in batch]
            if len({t.device for t in hs}) > 1:  # nixl: small frames land in host memory
                hs = [to_device(t, self.device) for t in hs]
            h = to_device(hs[0] if len(hs) == 1 else torch.cat(hs), self.device)  # [T, D]
            y = self.part(layer, h)  # [T, D]
            self.stats.record_ffn_batch(layer, mb, h.shape[0])
            if not self.transport.carries(y.device):
                y = to_host(y)  # one device-to-host copy for all r results, not one per send
            for (rank, _), y_k in zip(
                batch, torch.split(y, [t.shape[0] for _, t in batch]), strict=True
            ):
                self._reply(rank, layer, mb, y_k)
        return waited

    def _routing(self, rank, step, layer, mb, rows, deadline) -> torch.Tensor | None:
        """The ROUTING table of an activation of `rows` rows (sent just before it), checked
        against what this worker holds; None (logged, dropped) when missing or malformed."""
        key = make_key(rank, MsgType.ROUTING, step, layer, mb)
        msg = self.transport.mailbox.take_until(key, max(deadline, time.monotonic() + 0.05))
        r = None if msg is None else msg.tensor
        held = self.experts[layer].local
        if (
            r is None
            or r.dim() != 2
            or r.shape[0] != rows
            or r.dtype not in (torch.int32, torch.int64)
            or (r.numel() and (int(r.min()) < -1 or int(r.max()) >= held.numel()))
            or bool((held[r.clamp(min=0).long()][r >= 0] < 0).any())
        ):
            log.warning(
                "rank %d: missing or malformed ROUTING %s for layer %d mb %d: dropped",
                rank,
                None if r is None else (tuple(r.shape), r.dtype),
                layer,
                mb,
            )
            return None
        return r

    def _serve_routed(self, layer, mb, batch) -> None:
        """One routed batch: each peer's rows [N_k, D] and ROUTING [N_k, k] -> one unweighted
        output row per pair with an expert here, [P_k, D] per peer (row-major over its table)."""
        xs, rows, ids, sizes, offset = [], [], [], [], 0
        for _, (x, routing) in batch:
            mine = routing >= 0  # [N_k, k]
            rows.append(mine.nonzero()[:, 0] + offset)  # [P_k]
            ids.append(routing[mine].long())  # [P_k]
            sizes.append(int(mine.sum()))
            xs.append(x)
            offset += x.shape[0]
        if len({t.device for t in xs}) > 1:
            xs = [to_device(t, self.device) for t in xs]
        x = to_device(xs[0] if len(xs) == 1 else torch.cat(xs), self.device)  # [N, D]
        pair_rows = torch.cat(rows).to(x.device)  # [P]
        y = self.experts[layer].run(x, pair_rows, torch.cat(ids).to(x.device))  # [P, D]
        self.stats.record_ffn_batch(layer, mb, x.shape[0])
        if not self.transport.carries(y.device):
            y = to_host(y)
        for (rank, _), y_k in zip(batch, torch.split(y, sizes), strict=True):
            self._reply(rank, layer, mb, y_k)

    def _reply(self, rank: int, layer: int, mb: int, y: torch.Tensor) -> None:
        out = Message(
            MsgType.ACTIVATION_RESULT,
            self.peers[rank].step,
            layer,
            mb,
            self.transport.rank,
            tensor=y,
        )
        t0 = time.perf_counter()
        try:
            self.transport.send(rank, out)
        except TransportTimeout as exc:  # it died, stalled or is rejoining: it runs the step
            log.warning("result for rank %d (layer %d) not delivered: %s", rank, layer, exc)
            self.peers[rank].late = True  # again or its requests move; never wait for it now
            return
        self.stats.record_transfer(F2A, layer, time.perf_counter() - t0, y.nbytes)

    def reconnect(self, transport: Transport) -> None:
        """Serve over `transport` from now on (the group's data plane was rebuilt after an FFN
        worker's restart): every attention worker starts its steps afresh there."""
        self.transport = transport
        self.peers = {rank: _Peer() for rank in self.peers}

    def use_experts(self, experts: Mapping[int, ExpertSet]) -> None:
        """Serve the routed layers with `experts` from the next batch on (re-placement)."""
        self.experts = {**self.experts, **experts}


def _positions(sync: SyncInfo, num_layers: int) -> list[tuple[int, int]]:
    mbs = [i for i, n in enumerate(sync.tokens_per_microbatch) if n > 0]
    return [(layer, i) for layer in range(num_layers) for i in mbs]
