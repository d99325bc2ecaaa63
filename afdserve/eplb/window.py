"""Per-layer, per-expert token counts over a sliding window of steps: what EPLB balances."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from afdserve.errors import UserInputError


class ExpertLoadWindow:
    """The (token, slot) pairs each expert of each layer received over the last `window_steps`
    reports (an attention worker's step each). Layers without experts stay all zero."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int) -> None:
        if window_steps < 1:
            raise UserInputError(f"window_steps must be >= 1, got {window_steps}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self._reports: deque[dict[int, list[int]]] = deque()
        self._window = window_steps
        self._sum = [[0] * num_experts for _ in range(num_layers)]
        self.total_pairs = [[0] * num_experts for _ in range(num_layers)]
        """Since start (not windowed): what the metrics export as counters."""

    def add(self, counts: Mapping[int, Sequence[int]]) -> None:
        """One report: layer -> pairs per expert [E]."""
        clean: dict[int, list[int]] = {}
        for layer, row in counts.items():
            if not 0 <= int(layer) < self.num_layers or len(row) != self.num_experts:
                raise UserInputError(
                    f"expert counts for layer {layer!r} with {len(row)} entries do not fit "
                    f"{self.num_layers} layers of {self.num_experts} experts"
                )
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in row):
                raise UserInputError(f"expert counts must be integers >= 0, got {list(row)!r}")
            clean[int(layer)] = list(row)
        self._reports.append(clean)
        self._apply(clean, +1)
        for layer, row in clean.items():
            self.total_pairs[layer] = [
                a + b for a, b in zip(self.total_pairs[layer], row, strict=True)
            ]
        if len(self._reports) > self._window:
            self._apply(self._reports.popleft(), -1)

    def _apply(self, counts: dict[int, list[int]], sign: int) -> None:
        for layer, row in counts.items():
            self._sum[layer] = [a + sign * b for a, b in zip(self._sum[layer], row, strict=True)]

    def total(self) -> list[list[int]]:
        """[L, E] pairs per expert over the window."""
        return [list(row) for row in self._sum]

    def steps(self) -> int:
        return len(self._reports)

    def reset(self) -> None:
        self._reports.clear()
        self._sum = [[0] * self.num_experts for _ in range(self.num_layers)]
