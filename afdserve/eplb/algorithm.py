"""Expert load balancing: from per-expert token counts to a placement whose FFN workers get the
same load, replicating the hottest experts into the redundant slots.

DeepSeek's EPLB (deepseek-ai/EPLB) in two steps, per MoE layer:
1. replicate: every expert gets one replica; each redundant slot then goes to the expert with
   the largest load per replica (so a hot expert's tokens are split over several workers);
2. pack: the replicas, heaviest first (weight: load / replicas), each to the least-loaded worker
   that has a free slot and does not hold that expert yet.
With S = E + redundant slots, worker w has ceil(S/m) slots for w < S mod m, floor(S/m) after.
The hierarchical variant (DeepSeek's for node-limited routing) first packs groups of experts
onto nodes, then balances within each node's workers; `num_groups`, `num_nodes` select it.

Deterministic (ties go to the lowest index), torch-free.

Legend: L = layers, E = experts, m = FFN workers, R = redundant slots.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    to the least-loaded worker with room that lacks that expert. Per worker, its expert ids."""
    items = sorted(
        ((load[x] / reps[x], x) for x in range(len(load)) for _ in range(reps[x])),
        key=lambda t: (-t[0], t[1]),
    )
    held: list[list[int]] = [[] for _ in caps]
    total = [0.0] * len(caps)
    for weight, x in items:
        room = [w for w in range(len(caps)) if len(held[w]) < caps[w] and x not in held[w]]
        if not room:  # every worker with room already holds x: drop the surplus replica
            continue
        w = min(room, key=lambda w: (total[w], len(held[w]), w))
        held[w].append(x)
        total[w] += weight
    return [sorted(h) for h in held]


def rebalance(
    expert_load: Sequence[Sequence[float]],
    num_workers: int,
    redundant_slots: int,
    moe_layers: Sequence[bool] | None = None,
    version: int = 1,
    num_groups: int | None = None,
    num_nodes: int | None = None,
) -> Placement:
    """A balanced placement for `expert_load` [L, E] (token counts per expert; rows of dense
    layers, `moe_layers[l]` False, are ignored) over `num_workers` FFN workers."""
    if not expert_load or not expert_load[0]:
        raise UserInputError("expert_load must be a non-empty [layers, experts] table")
    e, m = len(expert_load[0]), num_workers
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise UserInputError(f"num_workers must be an integer >= 1, got {m!r}")
    if (
        isinstance(redundant_slots, bool)
        or not isinstance(redundant_slots, int)
        or redundant_slots < 0
    ):
        raise UserInputError(f"redundant_slots must be an integer >= 0, got {redundant_slots!r}")
    caps = capacities(e + redundant_slots, m)
    if max(caps) > e:
        raise UserInputError(
            f"{e + redundant_slots} slots over {m} workers gives one worker {max(caps)} slots, "
            f"more than the {e} experts: use fewer redundant slots"
        )
    moe = list(moe_layers) if moe_layers is not None else [True] * len(expert_load)
    if len(moe) != len(expert_load):
        raise UserInputError(f"moe_layers has {len(moe)} entries for {len(expert_load)} layers")
    layers: list[tuple[tuple[int, ...], ...] | None] = []
    for row, is_moe in zip(expert_load, moe, strict=True):
        if not is_moe:
            layers.append(None)
            continue
        load = [float(v) for v in row]
        if len(load) != e or any(not v >= 0 for v in load):
            raise UserInputError(f"expert loads must be {e} numbers >= 0 per layer, got {row!r}")
        if num_groups is None and num_nodes is None:
            held = pack(load, replicate(load, sum(caps), m), caps)
        else:
            held = _hierarchical(load, caps, num_groups, num_nodes)
        layers.append(tuple(tuple(h) for h in held))
    return Placement(e, m, tuple(layers), version)


def _hierarchical(
    load: list[float], caps: list[int], num_groups: int | None, num_nodes: int | None
) -> list[list[int]]:
    """Groups of E/num_groups consecutive experts packed onto nodes (equal group counts per
    node, by load), then replicate-and-pack inside each node over its m/num_nodes workers."""
    e, m = len(load), len(caps)
    if not num_groups or not num_nodes:
        raise UserInputError("the hierarchical variant needs both num_groups and num_nodes")
    if e % num_groups or m % num_nodes or num_groups % num_nodes:
        raise UserInputError(
            f"hierarchical EPLB needs experts ({e}) divisible by groups ({num_groups}), "
            f"workers ({m}) and groups divisible by nodes ({num_nodes})"
        )
    size, per_node = e // num_groups, m // num_nodes
    groups = [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]
    group_load = [sum(load[x] for x in g) for g in groups]
    node_of = pack(group_load, [1] * num_groups, [num_groups // num_nodes] * num_nodes)
    held: list[list[int]] = [[] for _ in range(m)]
    for node, gs in enumerate(node_of):
        experts = [x for g in gs for x in groups[g]]
        workers = list(range(node * per_node, (node + 1) * per_node))
        node_caps = [caps[w] for w in workers]
        sub = [load[x] for x in experts]
        slots = max(sum(node_caps), len(experts))
        if sum(node_caps) < len(experts):
            raise UserInputError(
                f"node {node} has {sum(node_caps)} slots for {len(experts)} experts"
            )
        for w, local in zip(
            workers, pack(sub, replicate(sub, slots, per_node), node_caps), strict=True
        ):
            held[w] = sorted(experts[i] for i in local)
    return held
