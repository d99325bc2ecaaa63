"""Per-layer, per-expert token counts over a sliding window of steps: what EPLB balances.

A window rather than a running total so that the placement follows the load as it drifts
(another mix of requests routes to other experts); a deque of the last reports plus a running
sum, so `total` is O(L*E) whatever the window length.

Legend: L = layers, E = experts per MoE layer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from afdserve.errors import UserInputError


class ExpertLoadWindow:
    """The (token, slot) pairs each expert of each layer received over the last `window_steps`
    reports (an attention worker's step each). Layers without experts stay all zero."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int) -> None:
        for name, v in (
            ("num_layers", num_layers),
            ("num_experts", num_experts),
            ("window_steps", window_steps),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {v!r}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self._window = window_steps
        self._reports: deque[np.ndarray] = deque()  # each [L, E] int64
        self._sum = np.zeros((num_layers, num_experts), dtype=np.int64)  # [L, E]
        self.total_pairs = [[0] * num_experts for _ in range(num_layers)]
        """[L, E] since start (not windowed, not cleared by reset): the metrics' counters."""

    def add(
        self, counts: Mapping[int, Sequence[int]] | Sequence[Sequence[int]] | np.ndarray
    ) -> None:
        """One report: either [L, E] counts (numpy or nested lists), or a mapping layer ->
        counts [E] for the layers it routed (the dispatcher's `take_counts`; JSON's string keys
        too), others zero."""
        step = self._dense(counts)  # [L, E]
        self._reports.append(step)
        self._sum += step
        for layer in np.flatnonzero(step.any(axis=1)):
            self.total_pairs[layer] = [
                a + b for a, b in zip(self.total_pairs[layer], step[layer].tolist(), strict=True)
            ]
        if len(self._reports) > self._window:
            self._sum -= self._reports.popleft()

    def _dense(self, counts: object) -> np.ndarray:
        """`counts` as a validated [L, E] int64 array."""
        shape = (self.num_layers, self.num_experts)
        out = np.zeros(shape, dtype=np.int64)
        if isinstance(counts, Mapping):
            for layer, row in counts.items():
                if isinstance(layer, str) and layer.isdecimal():  # a JSON object's key
                    layer = int(layer)
                if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
                    raise UserInputError(f"expert counts keyed by {layer!r}, not a layer index")
                if not 0 <= layer < self.num_layers:
                    raise UserInputError(
                        f"expert counts for layer {layer}, the window has {self.num_layers} layers"
                    )
                out[layer] = self._row(row, f"layer {layer}")
            return out
        if isinstance(counts, str | bytes) or not isinstance(counts, Sequence | np.ndarray):
            raise UserInputError(f"expert counts must be [{shape[0]}, {shape[1]}], got {counts!r}")
        if len(counts) != self.num_layers:
            raise UserInputError(
                f"expert counts have {len(counts)} layers, the window has {self.num_layers}"
            )
        for layer, row in enumerate(counts):
            out[layer] = self._row(row, f"layer {layer}")
        return out

    def _row(self, row: object, where: str) -> np.ndarray:
        try:
            arr = np.asarray(row)
        except (TypeError, ValueError, OverflowError):  # ragged
            arr = np.asarray(None)
        if arr.shape != (self.num_experts,):
            raise UserInputError(
                f"expert counts for {where} have shape {arr.shape}, want ({self.num_experts},)"
            )
        if arr.dtype.kind not in "iu" or (arr < 0).any():  # bools and floats too: not counts
            raise UserInputError(
                f"expert counts for {where} must be integers >= 0, got {arr.tolist()!r}"
            )
        return arr.astype(np.int64)

    def total(self) -> np.ndarray:
        """[L, E] int64 pairs per expert over the window (a copy)."""
        return self._sum.copy()

    def steps(self) -> int:
        """How many reports the window holds now (<= window_steps)."""
        return len(self._reports)

    def reset(self) -> None:
        """Forget the window (after a re-placement, say); `total_pairs` keeps counting."""
        self._reports.clear()
        self._sum[:] = 0
