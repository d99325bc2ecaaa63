"""Expert load balancing: from per-expert token counts to a placement whose FFN workers get the
same load, replicating the hottest experts into the redundant slots.

DeepSeek's EPLB (deepseek-ai/EPLB) in two steps, per MoE layer:
1. replicate: every expert gets one replica; each redundant slot then goes to the expert with
   the largest load per replica (so a hot expert's tokens are split over several workers);
2. pack: the replicas, heaviest first (weight: load / replicas), each to the least-loaded worker
   that has a free slot and does not hold that expert yet.
With S = E + redundant slots, worker w has ceil(S/m) slots for w < S mod m, floor(S/m) after.
Unlike DeepSeek's, an expert never gets two replicas on one worker (the second would take a
slot and take no work off that worker), so it has at most m replicas; slots those caps cannot
fill stay empty. The hierarchical variant (DeepSeek's for node-limited routing) first packs groups
of experts onto nodes, then balances within each node's workers; `num_groups`, `num_nodes`
select it.

A greedy heuristic, not an optimum: it can even come out worse than the contiguous blocks of
Placement.static on some loads (tests/eplb say which), so callers compare before switching
(controller.py re-places only for a clear gain).

Deterministic (ties go to the lowest index), torch-free.

Legend: L = layers, E = experts, m = FFN workers, R = redundant slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from afdserve.eplb.placement import Placement
from afdserve.errors import UserInputError


def capacities(num_slots: int, num_workers: int) -> list[int]:
    """Slots per worker: S spread as evenly as possible, the first S mod m one larger."""
    base, extra = divmod(num_slots, num_workers)
    return [base + (w < extra) for w in range(num_workers)]


def replicate(load: Sequence[float], slots: int, max_replicas: int) -> list[int]:
    """Replicas per expert [E] using `slots` >= E slots: one each, then each spare slot to the
    expert with the largest load per replica (at most `max_replicas` each)."""
    reps = [1] * len(load)
    for _ in range(slots - len(load)):
        best = max(
            (x for x in range(len(load)) if reps[x] < max_replicas),
            key=lambda x: (load[x] / reps[x], -x),
            default=None,
        )
        if best is None:
            break
        reps[best] += 1
    return reps


def pack(load: Sequence[float], reps: Sequence[int], caps: Sequence[int]) -> list[list[int]]:
    """Each expert's replicas onto workers with capacities `caps`, heaviest replica first, each
    to the least-loaded worker with room that lacks that expert. Per worker, its expert ids.

    Every expert keeps at least one replica when sum(caps) >= E: while an item is unplaced some
    worker has room, and no worker holds an expert before its first replica is placed. Only a
    surplus replica can find every worker with room already holding it; it is dropped."""
    items = sorted(
        ((load[x] / reps[x], x) for x in range(len(load)) for _ in range(reps[x])),
        key=lambda t: (-t[0], t[1]),
    )  # the replicas of one expert are consecutive (same weight, same id)
    held: list[set[int]] = [set() for _ in caps]
    total = [0.0] * len(caps)
    for weight, x in items:
        best = -1
        for w, cap in enumerate(caps):
            if len(held[w]) < cap and x not in held[w]:
                if best < 0 or (total[w], len(held[w])) < (total[best], len(held[best])):
                    best = w
        if best < 0:  # every worker with room already holds x: drop the surplus replica
            continue
        held[best].add(x)
        total[best] += weight
    return [sorted(h) for h in held]


def rebalance(
    expert_load: Sequence[Sequence[float]] | np.ndarray,
    num_workers: int,
    redundant_slots: int,
    moe_layers: Sequence[bool] | None = None,
    version: int = 1,
    num_groups: int | None = None,
    num_nodes: int | None = None,
) -> Placement:
    """A balanced placement for `expert_load` [L, E] (token counts per expert, numpy or nested
    lists; rows of dense layers, `moe_layers[l]` False, are ignored) over `num_workers` FFN
    workers with E + `redundant_slots` slots per MoE layer. With `num_groups` and `num_nodes`,
    the hierarchical variant: each group of E/num_groups consecutive experts on one node."""
    try:
        arr = np.asarray(expert_load, dtype=np.float64)  # [L, E]
    except (TypeError, ValueError):
        raise UserInputError("expert_load must be a [layers, experts] table of numbers") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserInputError(
            f"expert_load must be a non-empty [layers, experts] table, got shape {arr.shape}"
        )
    e, m = arr.shape[1], num_workers
    for name, v, low in (("num_workers", m, 1), ("redundant_slots", redundant_slots, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserInputError(f"{name} must be an integer >= {low}, got {v!r}")
    caps = capacities(e + redundant_slots, m)
    if max(caps) > e:
        raise UserInputError(
            f"{e + redundant_slots} slots over {m} workers gives one worker {max(caps)} slots, "
            f"more than the {e} experts: use fewer redundant slots"
        )
    moe = list(moe_layers) if moe_layers is not None else [True] * arr.shape[0]
    if len(moe) != arr.shape[0]:
        raise UserInputError(f"moe_layers has {len(moe)} entries for {arr.shape[0]} layers")
    hierarchical = num_groups is not None or num_nodes is not None
    if hierarchical:
        _check_hierarchy(e, m, num_groups, num_nodes)
    layers: list[tuple[tuple[int, ...], ...] | None] = []
    for layer, is_moe in enumerate(moe):
        if not is_moe:
            layers.append(None)
            continue
        row = arr[layer]
        if not np.all(np.isfinite(row)) or np.any(row < 0):
            raise UserInputError(
                f"expert loads must be finite numbers >= 0, layer {layer} has {row.tolist()!r}"
            )
        load = row.tolist()
        if hierarchical:
            held = _hierarchical(load, e + redundant_slots, m, num_groups, num_nodes)
        else:
            held = pack(load, replicate(load, sum(caps), m), caps)
        layers.append(tuple(tuple(h) for h in held))
    return Placement(e, m, tuple(layers), version)


def imbalance_of(
    expert_load: Sequence[Sequence[float]] | np.ndarray, placement: Placement
) -> list[float | None]:
    """Per layer max/mean worker load of `expert_load` [L, E] under `placement`."""
    return placement.imbalance(expert_load)


def _check_hierarchy(e: int, m: int, num_groups: int | None, num_nodes: int | None) -> None:
    for name, v in (("num_groups", num_groups), ("num_nodes", num_nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserInputError(
                f"the hierarchical variant needs num_groups and num_nodes as integers >= 1, "
                f"got {name}={v!r}"
            )
    if e % num_groups or m % num_nodes or num_groups % num_nodes:
        raise UserInputError(
            f"hierarchical EPLB needs experts ({e}) divisible by groups ({num_groups}), "
            f"and workers ({m}) and groups divisible by nodes ({num_nodes})"
        )


def _hierarchical(
    load: list[float], slots: int, m: int, num_groups: int, num_nodes: int
) -> list[list[int]]:
    """DeepSeek's rebalance_experts_hierarchical for one layer: groups of E/num_groups
    consecutive experts packed onto nodes (the same group count per node, by group load), then
    replicate-and-pack inside each node over its m/num_nodes workers.

    The S slots are spread evenly over nodes first, then over each node's workers: every node
    gets >= floor(S/n) >= E/n slots, enough for its experts, and no worker more than ceil(S/m)
    (the flat layout's capacities, possibly on other workers when S mod m != 0)."""
    e, per_node = len(load), m // num_nodes
    size = e // num_groups
    groups = [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]
    group_load = [sum(load[x] for x in g) for g in groups]
    node_of = pack(group_load, [1] * num_groups, [num_groups // num_nodes] * num_nodes)
    held: list[list[int]] = [[] for _ in range(m)]
    for node, (gs, node_slots) in enumerate(
        zip(node_of, capacities(slots, num_nodes), strict=True)
    ):
        experts = [x for g in gs for x in groups[g]]  # this node's experts, ascending
        sub = [load[x] for x in experts]
        node_caps = capacities(node_slots, per_node)
        local = pack(sub, replicate(sub, node_slots, per_node), node_caps)
        for i, ids in enumerate(local):
            held[node * per_node + i] = sorted(experts[j] for j in ids)
    return held
