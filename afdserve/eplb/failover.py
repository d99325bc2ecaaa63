"""Where a dead FFN worker's experts go: a placement over the surviving FFN workers (the front's
FFN failover, launch/failover.py).

Every expert of every MoE layer must stay on at least one survivor. An expert that already has
a replica on a survivor stays there, costing no load; each orphan (an expert only the down
workers held) goes to the survivor holding the fewest experts of that layer (heaviest orphan
first when the window's load is known, ties to the lowest worker index), which then loads it
from the model files. `max_experts` is a survivor's memory budget in experts per layer: a
failover that would need more is refused (None), and the group waits for the restart instead.

Torch-free and deterministic.

Legend: L = layers, E = experts per MoE layer, m = FFN workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from afdserve.eplb.placement import Placement


def survivor_placement(
    placement: Placement,
    down: Iterable[int],
    version: int,
    max_experts: int = 0,
    load: Sequence[Sequence[float]] | None = None,
) -> Placement | None:
    """`placement` with the FFN workers `down` (indices 0..m-1) holding nothing, each of their
    orphaned experts moved to a survivor; None when no worker survives or a survivor would
    exceed `max_experts` (0: no limit). `load` [L, E] orders the orphans, heaviest first."""
    gone = set(down) | set(placement.down)
    m = placement.num_workers
    live = [w for w in range(m) if w not in gone]
    if not live:
        return None
    layers: list[tuple[tuple[int, ...], ...] | None] = []
    for layer, workers in enumerate(placement.layers):
        if workers is None:
            layers.append(None)
            continue
        held = [set(ids) if w in live else set() for w, ids in enumerate(workers)]
        kept = set().union(*held)
        weights = load[layer] if load is not None else [0.0] * placement.num_experts
        orphans = sorted(
            (x for x in range(placement.num_experts) if x not in kept),
            key=lambda x: (-float(weights[x]), x),
        )
        for x in orphans:
            w = min(live, key=lambda v: (len(held[v]), v))
            if max_experts and len(held[w]) >= max_experts:
                return None
            held[w].add(x)
        if max_experts and any(len(held[w]) > max_experts for w in live):
            return None  # a survivor already held more than its budget allows
        layers.append(tuple(tuple(sorted(h)) for h in held))
    return Placement(placement.num_experts, m, tuple(layers), version, tuple(sorted(gone)))


def to_load(old: Placement, new: Placement) -> dict[int, dict[int, list[int]]]:
    """Per FFN worker with something to load: layer -> the experts `new` gives it that `old`
    did not (what a survivor reads from the model files)."""
    out: dict[int, dict[int, list[int]]] = {}
    for layer in new.moe_layers:
        for w in new.live:
            have = set(old.experts_of(layer, w))
            extra = [x for x in new.experts_of(layer, w) if x not in have]
            if extra:
                out.setdefault(w, {})[layer] = extra
    return out
