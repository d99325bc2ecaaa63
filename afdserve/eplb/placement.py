# TEMPORARY STUB (replaced by helper's version)
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    num_experts: int
    num_workers: int
    layers: tuple
    version: int = 0

    @classmethod
    def static(cls, moe_layers, num_experts, num_workers):
        e, m = num_experts, num_workers
        per = tuple(tuple(range(w * e // m, (w + 1) * e // m)) for w in range(m))
        return cls(e, m, tuple(per if x else None for x in moe_layers))

    def workers_of(self, layer, expert):
        return tuple(w for w, ids in enumerate(self.layers[layer]) if expert in ids)

    def experts_of(self, layer, worker):
        return self.layers[layer][worker]

    def to_dict(self):
        return {
            "num_experts": self.num_experts,
            "num_workers": self.num_workers,
            "version": self.version,
            "layers": [None if l is None else [list(w) for w in l] for l in self.layers],
        }

    @classmethod
    def from_dict(cls, d):
        return cls(
            d["num_experts"],
            d["num_workers"],
            tuple(None if l is None else tuple(tuple(w) for w in l) for l in d["layers"]),
            d["version"],
        )
