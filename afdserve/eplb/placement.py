"""The placement table of expert parallelism: which FFN workers hold which experts of each MoE
layer. An expert may sit on several workers (replicas, "redundant experts"); the attention
workers then deal its tokens round-robin over them (afd/expert_dispatch.py).

Plain data, torch-free: the front builds and ships it (`to_dict`), every worker reads it.

Legend: L = layers, E = experts per MoE layer, m = FFN workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from afdserve.errors import UserInputError


@dataclass(frozen=True)
class Placement:
    num_experts: int
    """E, the experts of each MoE layer."""
    num_workers: int
    """m, the FFN workers."""
    layers: tuple[tuple[tuple[int, ...], ...] | None, ...]
    """One entry per model layer: None for a dense layer, else per FFN worker the sorted expert
    ids it holds in that layer."""
    version: int = 0
    """Bumped by each re-placement."""
    _owners: tuple[tuple[tuple[int, ...], ...] | None, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        e, m = self.num_experts, self.num_workers
        for name, v, low in (
            ("num_experts", e, 1),
            ("num_workers", m, 1),
            ("version", self.version, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserInputError(f"placement {name} must be an integer >= {low}, got {v!r}")
        owners: list[tuple[tuple[int, ...], ...] | None] = []
        for layer, workers in enumerate(self.layers):
            if workers is None:
                owners.append(None)
                continue
            if len(workers) != m:
                raise UserInputError(
                    f"placement layer {layer}: {len(workers)} worker entries for {m} FFN workers"
                )
            of: list[list[int]] = [[] for _ in range(e)]
            for w, ids in enumerate(workers):
                if list(ids) != sorted(set(ids)):
                    raise UserInputError(
                        f"placement layer {layer} worker {w}: expert ids {list(ids)} must be "
                        "sorted and distinct"
                    )
                for x in ids:
                    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < e:
                        raise UserInputError(
                            f"placement layer {layer} worker {w}: expert {x!r} not in 0..{e - 1}"
                        )
                    of[x].append(w)
            missing = [x for x in range(e) if not of[x]]
            if missing:
                raise UserInputError(f"placement layer {layer}: experts {missing} held nowhere")
            owners.append(tuple(tuple(ws) for ws in of))
        object.__setattr__(self, "_owners", tuple(owners))

    @classmethod
    def static(cls, moe_layers: Sequence[bool], num_experts: int, num_workers: int) -> Placement:
        """No replicas: worker w holds experts [w*E//m, (w+1)*E//m) of every MoE layer (E need
        not divide by m; with m > E some workers hold none)."""
        e, m = num_experts, num_workers
        per = tuple(tuple(range(w * e // m, (w + 1) * e // m)) for w in range(m))
        return cls(e, m, tuple(per if moe else None for moe in moe_layers))

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.layers) if w is not None]

    def workers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        """The FFN workers holding a replica of `expert`, ascending."""
        return self._owners[layer][expert]

    def experts_of(self, layer: int, worker: int) -> tuple[int, ...]:
        return self.layers[layer][worker]

    def replica_counts(self, layer: int) -> list[int]:  # [E]
        return [len(ws) for ws in self._owners[layer]]

    def worker_load(self, layer: int, expert_load: Sequence[float]) -> list[float]:
        """[m] the load each worker gets when each expert's tokens are split evenly over its
        replicas (as the round-robin deal does)."""
        out = [0.0] * self.num_workers
        for x, ws in enumerate(self._owners[layer]):
            for w in ws:
                out[w] += float(expert_load[x]) / len(ws)
        return out

    def imbalance(self, expert_load: Sequence[Sequence[float]]) -> list[float | None]:
        """Per layer, max/mean worker load for `expert_load` [L, E] (None for dense layers, 1.0
        for a layer without load): 1.0 is perfect balance, m is everything on one worker."""
        out: list[float | None] = []
        for layer, workers in enumerate(self.layers):
            if workers is None:
                out.append(None)
                continue
            load = self.worker_load(layer, expert_load[layer])
            mean = sum(load) / len(load)
            out.append(max(load) / mean if mean > 0 else 1.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "num_workers": self.num_workers,
            "version": self.version,
            "layers": [None if ws is None else [list(ids) for ids in ws] for ws in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Placement:
        try:
            layers = tuple(
                None if ws is None else tuple(tuple(ids) for ids in ws) for ws in d["layers"]
            )
            return cls(int(d["num_experts"]), int(d["num_workers"]), layers, int(d["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UserInputError):
                raise
            raise UserInputError(f"malformed placement: {exc!r}") from None

    def render(self, expert_load: Sequence[Sequence[float]] | None = None) -> str:
        """The table: a row per MoE layer, a column per FFN worker with its experts (a replica
        marked *), and with `expert_load` each worker's load and the layer's max/mean."""
        lines = [
            f"placement v{self.version}: {self.num_experts} experts over {self.num_workers} FFN workers"
        ]
        imb = self.imbalance(expert_load) if expert_load is not None else None
        for layer in self.moe_layers:
            reps = self.replica_counts(layer)
            cells = []
            for w, ids in enumerate(self.layers[layer]):
                if self.num_experts <= 16:
                    body = ",".join(f"{x}{'*' if reps[x] > 1 else ''}" for x in ids) or "-"
                else:
                    body = f"{len(ids)} experts"
                if expert_load is not None:
                    body += f" ({self.worker_load(layer, expert_load[layer])[w]:.0f})"
                cells.append(f"F{w}: {body}")
            tail = f"  max/mean {imb[layer]:.3f}" if imb is not None else ""
            lines.append(f"  layer {layer:>3}  " + "  ".join(cells) + tail)
        return "\n".join(lines)
