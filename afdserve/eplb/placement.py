"""The placement table of expert parallelism: which FFN workers hold which experts of each MoE
layer. An expert may sit on several workers (replicas, "redundant experts"); the attention
workers then deal its tokens round-robin over them (afd/expert_dispatch.py).

Plain data, torch-free: the front builds and ships it (`to_dict`), every worker reads it.

Legend: L = layers, E = experts per MoE layer, m = FFN workers.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from afdserve.errors import UserInputError

RENDER_WIDTH = 100
"""The columns render() keeps to when it lists experts (a terminal, a log line)."""


def _expert_id(x: Any, layer: int, worker: int, e: int) -> int:
    """`x` as an expert id in 0..E-1 (numpy integers too, never a bool or a float)."""
    try:
        if isinstance(x, bool):
            raise TypeError
        i = operator.index(x)
    except TypeError:
        i = -1
    if not 0 <= i < e:
        raise UserInputError(
            f"placement layer {layer} worker {worker}: expert {x!r} not in 0..{e - 1}"
        )
    return i


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
    down: tuple[int, ...] = ()
    """FFN workers out of service (dead, restarting: an FFN failover, launch/failover.py): they
    hold no expert, and attention workers send them nothing, dense layers' rows included."""
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
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
            raise UserInputError(f"placement layers must be a sequence, got {self.layers!r}")
        layers: list[tuple[tuple[int, ...], ...] | None] = []
        owners: list[tuple[tuple[int, ...], ...] | None] = []
        for layer, workers in enumerate(self.layers):
            if workers is None:
                layers.append(None)
                owners.append(None)
                continue
            if isinstance(workers, str | bytes) or not isinstance(workers, Sequence | np.ndarray):
                raise UserInputError(f"placement layer {layer}: {workers!r} is not a worker list")
            if len(workers) != m:
                raise UserInputError(
                    f"placement layer {layer}: {len(workers)} worker entries for {m} FFN workers"
                )
            of: list[list[int]] = [[] for _ in range(e)]
            held: list[tuple[int, ...]] = []
            for w, ids in enumerate(workers):
                if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
                    raise UserInputError(
                        f"placement layer {layer} worker {w}: {ids!r} is not a list of expert ids"
                    )
                clean = tuple(_expert_id(x, layer, w, e) for x in ids)
                if list(clean) != sorted(set(clean)):
                    raise UserInputError(
                        f"placement layer {layer} worker {w}: expert ids {list(clean)} must be "
                        "sorted and distinct"
                    )
                for x in clean:
                    of[x].append(w)
                held.append(clean)
            missing = [x for x in range(e) if not of[x]]
            if missing:
                raise UserInputError(f"placement layer {layer}: experts {missing} held nowhere")
            layers.append(tuple(held))
            owners.append(tuple(tuple(ws) for ws in of))
        down = self.down
        if isinstance(down, str | bytes) or not isinstance(down, Sequence):
            raise UserInputError(f"placement down must be a list of FFN workers, got {down!r}")
        ok = all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < m for w in down)
        down = tuple(int(w) for w in down) if ok else down
        if not ok or list(down) != sorted(set(down)) or len(down) >= m:
            raise UserInputError(
                f"placement down {list(down)}: sorted distinct FFN workers, not all {m} of them"
            )
        for layer, held in enumerate(layers):
            for w in down:
                if held is not None and held[w]:
                    raise UserInputError(
                        f"placement layer {layer}: FFN worker {w} is down but holds experts"
                    )
        object.__setattr__(self, "down", down)
        # lists (or numpy ints) in, tuples of ints stored: hashable, and == compares by content
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "_owners", tuple(owners))

    @classmethod
    def static(cls, moe_layers: Sequence[bool], num_experts: int, num_workers: int) -> Placement:
        """No replicas: worker w holds experts [w*E//m, (w+1)*E//m) of every MoE layer (E need
        not divide by m; with m > E some workers hold none)."""
        e, m = num_experts, num_workers
        per = tuple(tuple(range(w * e // m, (w + 1) * e // m)) for w in range(m))
        return cls(e, m, tuple(per if moe else None for moe in moe_layers))

    @property
    def live(self) -> list[int]:
        """The FFN workers in service, ascending."""
        return [w for w in range(self.num_workers) if w not in self.down]

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

    def owner_table(self, layer: int) -> np.ndarray:
        """[E, R] int64, R = the layer's largest replica count: row x lists the workers holding
        expert x, ascending, padded with -1. For vectorised dispatch: a (token, slot) pair on
        expert x with replica choice j < replica_counts[x] goes to table[x, j]."""
        owners = self._owners[layer]
        if owners is None:
            raise UserInputError(f"layer {layer} is dense: it has no expert owners")
        table = np.full((self.num_experts, max(len(ws) for ws in owners)), -1, dtype=np.int64)
        for x, ws in enumerate(owners):
            table[x, : len(ws)] = ws
        return table

    def worker_load(self, layer: int, expert_load: Sequence[float]) -> list[float]:
        """[m] the load each worker gets when each expert's tokens are split evenly over its
        replicas (as the round-robin deal does)."""
        if len(expert_load) != self.num_experts:
            raise UserInputError(
                f"layer {layer}: {len(expert_load)} expert loads for {self.num_experts} experts"
            )
        out = [0.0] * self.num_workers
        for x, ws in enumerate(self._owners[layer]):
            for w in ws:
                out[w] += float(expert_load[x]) / len(ws)
        return out

    def imbalance(self, expert_load: Sequence[Sequence[float]]) -> list[float | None]:
        """Per layer, max/mean worker load for `expert_load` [L, E] (None for dense layers, 1.0
        for a layer without load): 1.0 is perfect balance, m is everything on one worker."""
        if len(expert_load) != len(self.layers):
            raise UserInputError(
                f"expert load has {len(expert_load)} layers, the placement {len(self.layers)}"
            )
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
            "down": list(self.down),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Placement:
        try:
            layers = tuple(
                None if ws is None else tuple(tuple(ids) for ids in ws) for ws in d["layers"]
            )
            down = tuple(d.get("down", ()))
            return cls(
                int(d["num_experts"]), int(d["num_workers"]), layers, int(d["version"]), down
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UserInputError):
                raise
            raise UserInputError(f"malformed placement: {exc!r}") from None

    def render(self, expert_load: Sequence[Sequence[float]] | None = None) -> str:
        """The printable table: a row per MoE layer, a column per FFN worker with its experts
        (a replicated one marked *), and with `expert_load` [L, E] a second row of each worker's
        load and the layer's max/mean. Expert lists while they fit RENDER_WIDTH (E <= 16 and
        m <= 4 do), else expert counts per worker."""
        m, moe = self.num_workers, self.moe_layers
        imb = self.imbalance(expert_load) if expert_load is not None else None
        lists = {layer: self._cells(layer, True) for layer in moe}
        widest = max((len(c) for cells in lists.values() for c in cells), default=0)
        if self.num_experts > 16 or 7 + m * (widest + 2) + 10 > RENDER_WIDTH:
            lists = {layer: self._cells(layer, False) for layer in moe}
        loads = {
            layer: [f"{v:.0f}" for v in self.worker_load(layer, expert_load[layer])]
            for layer in moe
            if expert_load is not None
        }
        width = max(
            [len(f"F{m - 1}")] + [len(c) for cs in (*lists.values(), *loads.values()) for c in cs]
        )
        dense = len(self.layers) - len(moe)
        lines = [
            f"placement v{self.version}: {self.num_experts} experts over {m} FFN workers"
            + " (* replicated)"
            + (f", {dense} dense layer{'s' * (dense > 1)} not shown" if dense else "")
            + (f"; down: {', '.join(f'F{w}' for w in self.down)}" if self.down else ""),
            (
                "layer  "
                + "  ".join(f"F{w}".ljust(width) for w in range(m))
                + ("  max/mean" if imb is not None else "")
            ).rstrip(),
        ]
        for layer in moe:
            row = f"{layer:>5}  " + "  ".join(c.ljust(width) for c in lists[layer])
            if imb is not None:
                lines.append(f"{row}  {imb[layer]:.3f}")
                lines.append(" " * 7 + "  ".join(c.ljust(width) for c in loads[layer]).rstrip())
            else:
                lines.append(row.rstrip())
        return "\n".join(lines)

    def _cells(self, layer: int, as_list: bool) -> list[str]:
        """Per worker of `layer`: its experts ("0,3*,8", "-" for none), or their count."""
        if not as_list:
            return [f"{len(ids)} experts" for ids in self.layers[layer]]
        reps = self.replica_counts(layer)
        return [
            ",".join(f"{x}{'*' if reps[x] > 1 else ''}" for x in ids) or "-"
            for ids in self.layers[layer]
        ]
