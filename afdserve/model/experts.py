"""The routed experts of one MoE layer, split into the three steps expert parallelism places
apart: `route` (router logits -> top-k experts and weights), `ExpertSet.run` (the expert GEMMs of
the (token, slot) pairs a holder of those experts receives) and `combine` (each token's weighted
sum over its k slots, in slot order).

Aggregated serving and rA:1F run the three back to back on every expert (`MoE.forward`). Under
expert parallelism (rA:mF) the attention worker routes, each FFN worker runs `ExpertSet.run` on
the pairs routed to its experts, and the attention worker combines. `combine` sums a token's k
outputs in one fixed order (slot 0, the highest weight, first), whoever computed them, so the
result is the aggregated one bit for bit in the exact mode: each expert's GEMM runs on fixed row
tiles there, so a pair's output does not depend on which other pairs, or which other experts,
share the FFN worker (model/kernels.py).

Legend: T = tokens, D = hidden size, I = expert intermediate size, E = experts of the layer,
n = experts this set holds, k = experts per token, P = (token, slot) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from afdserve.model.kernels import Kernels, compute_dtype

GROUPED_ROWS = 64
"""Fast mode: below this many (token, expert) pairs per expert on average, all experts run as
one batched GEMM per projection (rows padded to the busiest expert's) instead of a loop of
per-expert GEMMs, whose Python and call overhead dominates at decode sizes."""


def route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's routing: softmax in float32 over all experts, top-k, optional renormalisation, cast
    to the activation dtype. router_logits [T, E] -> (weights [T, k] in `dtype`, experts [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k], [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def combine(ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's output: its k expert outputs ys [T*k, D] ((token, slot) order) weighted by
    weights [T, k] and summed in slot order -> [T, D]."""
    t, k = weights.shape
    y = ys.view(t, k, -1) * weights[:, :, None]  # [T, k, D]
    out = y[:, 0]
    for j in range(1, k):  # fixed order: slot 0 (highest weight) first
        out = out + y[:, j]
    return out


class ExpertSet:
    """Some (or all) of one layer's E experts, prepared for their kernels.

    The exact mode keeps one prepared weight per expert (tiled GEMMs); the fast mode one stacked
    tensor per projection (grouped and per-expert GEMMs both read it). Immutable: a re-placement
    builds a new set (`subset`, `union`), so a batch running on the old one is never disturbed.
    """

    def __init__(
        self,
        ids: Sequence[int],
        w_gate_up: torch.Tensor,  # [n, 2I, D]: gate rows, then up rows
        w_down: torch.Tensor,  # [n, D, I]
        num_experts: int,
        kernels: Kernels,
    ) -> None:
        ids = tuple(int(e) for e in ids)
        if len(ids) != w_gate_up.shape[0] or len(ids) != w_down.shape[0]:
            raise ValueError(f"{len(ids)} expert ids for {w_gate_up.shape[0]} expert weights")
        self._init(ids, num_experts, kernels)
        if kernels.batch_invariant:
            self.prepared = (
                [kernels.prepare(w) for w in w_gate_up],  # n x [2I, D]
                [kernels.prepare(w) for w in w_down],  # n x [D, I]
            )
            self.stacked = None
        else:
            dtype = compute_dtype(w_down)
            self.prepared = None
            self.stacked = (
                w_gate_up.to(dtype).transpose(1, 2).contiguous(),  # [n, D, 2I]
                w_down.to(dtype).transpose(1, 2).contiguous(),  # [n, I, D]
            )

    def _init(self, ids: tuple[int, ...], num_experts: int, kernels: Kernels) -> None:
        if len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
            raise ValueError(f"expert ids {ids} must be distinct and in 0..{num_experts - 1}")
        self.ids, self.num_experts, self.kernels = ids, num_experts, kernels
        self.local = torch.full((num_experts,), -1, dtype=torch.int64)  # [E] global -> local
        self.local[list(ids)] = torch.arange(len(ids))
        self.held = frozenset(ids)

    def subset(self, ids: Sequence[int]) -> ExpertSet:
        """The experts `ids` of this set (sharing its prepared weights where it can)."""
        pick = [int(self.local[e]) for e in ids]
        if any(i < 0 for i in pick):
            raise ValueError(f"experts {sorted(set(ids) - self.held)} are not in this set")
        out = ExpertSet.__new__(ExpertSet)
        out._init(tuple(int(e) for e in ids), self.num_experts, self.kernels)
        if self.prepared is not None:
            out.prepared = (
                [self.prepared[0][i] for i in pick],
                [self.prepared[1][i] for i in pick],
            )
            out.stacked = None
        else:
            out.prepared = None
            out.stacked = (self.stacked[0][pick].contiguous(), self.stacked[1][pick].contiguous())
        return out

    def union(self, other: ExpertSet) -> ExpertSet:
        """This set plus `other`'s experts that it lacks (ids in ascending order)."""
        ids = sorted(self.held | other.held)
        out = ExpertSet.__new__(ExpertSet)
        out._init(tuple(ids), self.num_experts, self.kernels)
        src = [
            (self, int(self.local[e])) if e in self.held else (other, int(other.local[e]))
            for e in ids
        ]
        if self.prepared is not None:
            out.prepared = (
                [s.prepared[0][i] for s, i in src],
                [s.prepared[1][i] for s, i in src],
            )
            out.stacked = None
        else:
            out.prepared = None
            out.stacked = tuple(torch.stack([s.stacked[p][i] for s, i in src]) for p in (0, 1))  # type: ignore[assignment]
        return out

    def run(
        self, x: torch.Tensor, pair_rows: torch.Tensor, pair_experts: torch.Tensor
    ) -> torch.Tensor:
        """The expert outputs of P (row, expert) pairs, in pair order: x [N, D], pair_rows [P]
        (rows of x), pair_experts [P] (global expert ids, each held here) -> [P, D]. Unweighted:
        the router's weights are applied by `combine`."""
        local = self.local[pair_experts]  # [P]
        if local.numel() and int(local.min()) < 0:
            missing = sorted(set(pair_experts.tolist()) - self.held)
            raise ValueError(f"pairs routed to experts {missing}, which this set does not hold")
        order = torch.argsort(local, stable=True)  # [P] pairs grouped by expert
        counts = torch.bincount(local, minlength=len(self.ids)).tolist()  # [n]
        xs = x[pair_rows[order]]  # [P, D] rows in expert order
        if self.prepared is not None:
            ys = self._tiled(xs, counts)
        else:
            ys = self._fast(xs, counts, local[order])
        y = torch.empty_like(ys)
        y[order] = ys  # back to pair order
        return y

    def _tiled(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The exact mode: each expert's slice of `xs` [P, D] through its own GEMMs."""
        w_gate_up, w_down = self.prepared
        ys = torch.empty_like(xs)  # [P, D]
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate, up = self.kernels.linear(xs[start : start + n], w_gate_up[e]).chunk(
                    2, dim=-1
                )  # [n, I]
                ys[start : start + n] = self.kernels.linear(F.silu(gate) * up, w_down[e])
                start += n
        return ys

    def _fast(self, xs: torch.Tensor, counts: list[int], expert_of: torch.Tensor) -> torch.Tensor:
        """The fast mode: `xs` [P, D] (grouped by expert; `expert_of` [P] local ids) through the
        stacked weights, as one grouped GEMM per projection when experts get few rows."""
        w_gate_up, w_down = self.stacked  # [n, D, 2I], [n, I, D]
        dtype = xs.dtype
        xc = xs.to(w_gate_up.dtype)
        active = sum(1 for n in counts if n)
        if 0 < xs.shape[0] < GROUPED_ROWS * active:
            e, rows = len(counts), max(counts)
            starts = torch.tensor([0, *counts[:-1]], device=xs.device).cumsum(0)  # [n]
            within = torch.arange(xs.shape[0], device=xs.device) - starts[expert_of]  # [P]
            dest = expert_of * rows + within  # [P] row in the padded [n * rows] grid
            xp = xc.new_zeros(e * rows, xc.shape[1])  # [n * rows, D]
            xp[dest] = xc
            h = torch.bmm(xp.view(e, rows, -1), w_gate_up)  # [n, rows, 2I]
            gate, up = h.chunk(2, dim=-1)  # [n, rows, I]
            o = torch.bmm(F.silu(gate, inplace=True).mul_(up), w_down)  # [n, rows, D]
            return o.view(e * rows, -1)[dest].to(dtype)  # [P, D]
        ys = torch.empty_like(xc)  # [P, D]
        start = 0
        for ex, n in enumerate(counts):
            if n:
                gate, up = (xc[start : start + n] @ w_gate_up[ex]).chunk(2, dim=-1)  # [n, I]
                ys[start : start + n] = F.silu(gate, inplace=True).mul_(up) @ w_down[ex]
                start += n
        return ys.to(dtype)


def token_pairs(experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T*k (token, slot) pairs of experts [T, k] in (token, slot) order: (rows [T*k],
    expert ids [T*k])."""
    t, k = experts.shape
    rows = torch.arange(t, device=experts.device).repeat_interleave(k)  # [T*k]
    return rows, experts.flatten()
