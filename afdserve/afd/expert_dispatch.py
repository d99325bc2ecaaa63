"""How an attention worker splits one (layer, microbatch) over m FFN workers, and puts the
answers back together (rA:mF).

- A MoE layer is routed here: the attention worker runs the layer's post-attention norm and
  router (model/parts.py RouterPart), and sends each FFN worker only the tokens with a slot on
  one of its experts, with an int32 [N_w, k] table of those slots' expert ids (-1 for slots
  served elsewhere). A replicated expert's pairs are dealt round-robin over its replicas,
  starting at a replica that depends on this worker's rank, so r attention workers spread the
  load of a hot expert evenly. The FFN worker returns one unweighted output row per pair
  (row-major over its table), and `gather` weights and sums each token's k outputs in slot
  order (model/experts.py `combine`): the aggregated MoE's arithmetic, bit for bit in the exact
  mode, whichever worker or replica computed each pair.
- A dense layer (or any layer when m = 1) is sent whole: its rows are cut into m contiguous
  chunks, chunk c going to FFN worker (c + rank) mod m, each of which holds the whole MLP (a
  replica; rows are independent, so the split is exact). Tensor-parallel shards of the MLP
  would save memory but sum partial products in another order than one GEMM does: not exact.

After an FFN failover the placement names FFN workers that are down (`Placement.down`): they
hold no expert, a dense layer's rows are cut over the live workers only, and they are sent
nothing at all (`live`), not even the empty frames below.

An FFN worker that gets no rows of a position is still sent an empty [0, D] activation (its
plan, from the step's SYNC, expects one from every attention worker at every position) and
answers nothing; the attention worker does not wait for an answer to an empty send.

Legend: T = tokens of the microbatch, D = hidden size, k = experts per token, E = experts,
m = FFN workers, N_w = rows sent to FFN worker w, P_w = pairs served by FFN worker w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.eplb.placement import Placement
from afdserve.model.experts import combine
from afdserve.model.parts import RouterPart


@dataclass
class Send:
    """What goes to one FFN worker for one (layer, microbatch)."""

    x: torch.Tensor  # [N_w, D] rows (normalised ones when routed)
    routing: torch.Tensor | None  # [N_w, k] int32 expert ids, -1 elsewhere (routed layers)

    @property
    def expects_reply(self) -> bool:
        return self.x.shape[0] > 0


@dataclass
class Dispatch:
    """Where one (layer, microbatch)'s rows went, to put the answers back together."""

    tokens: int
    places: list[torch.Tensor]
    """Per FFN worker: the token rows it got [N_w] (whole layers) or its pairs' indices in
    (token, slot) order [P_w] (routed layers)."""
    weights: torch.Tensor | None = None  # [T, k] routed layers' router weights


class ExpertDispatcher:
    """The dispatch of one attention worker (`rank`) over `num_ffn` FFN workers."""

    def __init__(
        self, rank: int, num_ffn: int, router: RouterPart | None, placement: Placement | None
    ) -> None:
        self.rank, self.num_ffn, self.router = rank, num_ffn, router
        self.placement: Placement | None = None
        self.live: tuple[int, ...] = tuple(range(num_ffn))
        """The FFN workers this worker sends to (all but the placement's `down`)."""
        self._owners: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.expert_counts: dict[int, torch.Tensor] = {}
        """Per routed layer, pairs routed to each expert [E] since the last `take_counts`."""
        if placement is not None:
            self.use(placement)

    def use(self, placement: Placement) -> None:
        """Route with `placement` from the next `plan` on (between steps: a re-placement)."""
        if placement.num_workers != self.num_ffn:
            raise ValueError(
                f"placement for {placement.num_workers} FFN workers, this group has {self.num_ffn}"
            )
        owners = {}
        for layer, workers in enumerate(placement.layers):
            if workers is None:
                continue
            table = [placement.workers_of(layer, e) for e in range(placement.num_experts)]
            width = max(len(t) for t in table)
            owner = torch.tensor([list(t) + [-1] * (width - len(t)) for t in table])  # [E, R]
            owners[layer] = (owner, torch.tensor([len(t) for t in table]))  # [E, R], [E]
        self.placement, self._owners = placement, owners
        self.live = tuple(placement.live)

    def routed(self, layer: int) -> bool:
        return self.router is not None and layer in self._owners

    def plan(self, layer: int, h: torch.Tensor) -> tuple[list[Send], Dispatch]:
        """h [T, D] (attention output plus residual) -> what each FFN worker gets."""
        if self.routed(layer):
            return self._plan_routed(layer, h)
        t, live = h.shape[0], self.live
        n = len(live)
        bounds = [t * c // n for c in range(n + 1)]
        sends = [Send(h[:0], None) for _ in range(self.num_ffn)]  # down workers: nothing
        places = [torch.arange(0) for _ in range(self.num_ffn)]
        for c in range(n):
            w = live[(c + self.rank) % n]
            sends[w] = Send(h[bounds[c] : bounds[c + 1]], None)
            places[w] = torch.arange(bounds[c], bounds[c + 1])
        return sends, Dispatch(t, places)

    def _plan_routed(self, layer: int, h: torch.Tensor) -> tuple[list[Send], Dispatch]:
        x, weights, experts = self.router.route(layer, h)  # [T, D], [T, k], [T, k]
        t, k = experts.shape
        owner, replicas = self._owners[layer]  # [E, R], [E]
        flat = experts.flatten().cpu()  # [T*k] (token, slot) order
        counts = torch.bincount(flat, minlength=owner.shape[0])  # [E]
        self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
        order = torch.argsort(flat, stable=True)  # [T*k] pairs grouped by expert
        starts = counts.cumsum(0) - counts  # [E]
        within = torch.empty_like(flat)
        within[order] = torch.arange(flat.numel()) - starts[flat[order]]  # index among e's pairs
        rep = (within + self.rank) % replicas[flat]  # [T*k] which replica serves the pair
        worker = owner[flat, rep].view(t, k)  # [T, k]
        ids = experts.cpu().to(torch.int32)
        sends, places = [], []
        for w in range(self.num_ffn):
            mine = worker == w  # [T, k]
            rows = mine.any(dim=1).nonzero().squeeze(1)  # [N_w] tokens with a slot here
            table = torch.where(mine[rows], ids[rows], -1).to(torch.int32)  # [N_w, k]
            sends.append(Send(x[rows.to(x.device)], table))
            places.append(mine.flatten().nonzero().squeeze(1))  # [P_w] row-major = FFN's order
        return sends, Dispatch(t, places, weights)

    def gather(
        self, d: Dispatch, replies: list[torch.Tensor | None], like: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output [T, D] from each FFN worker's reply (None where nothing was sent)."""
        if d.weights is None:
            out = like.new_empty(d.tokens, like.shape[1])  # [T, D]
        else:
            out = like.new_empty(d.tokens * d.weights.shape[1], like.shape[1])  # [T*k, D]
        for place, y in zip(d.places, replies, strict=True):
            if place.numel():
                if y is None or tuple(y.shape) != (place.numel(), like.shape[1]):
                    raise ValueError(
                        f"FFN reply of shape {None if y is None else tuple(y.shape)} for "
                        f"{place.numel()} rows"
                    )
                out[place.to(out.device)] = y.to(out.device)
        return out if d.weights is None else combine(out, d.weights)

    def take_counts(self) -> dict[int, list[int]]:
        """Per routed layer, pairs per expert since the last call (then reset)."""
        out = {layer: c.tolist() for layer, c in self.expert_counts.items()}
        self.expert_counts = {}
        return out
