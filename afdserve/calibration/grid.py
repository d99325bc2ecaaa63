"""What `afdserve profile` measures: the grid of batch sizes, contexts and token counts each
part is timed over, and how often each point is timed.

Its own module: the CLI verbs and `validate_runtime` build and pass grids on without needing
the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from afdserve.errors import UserInputError


@dataclass(frozen=True)
class ProfileGrid:
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    ffn_tokens: tuple[int, ...] = (1, 8, 32, 128, 512)
    prefill_chunks: tuple[int, ...] = (16, 64, 256)
    prefill_starts: tuple[int, ...] = (0, 256)
    prefill_sequences: tuple[int, ...] = (1, 8, 16)
    """Sequences prefilled together in one chunk (a step batches several prompts)."""
    step_batches: tuple[int, ...] = (1, 8, 16, 32)
    transport_tokens: tuple[int, ...] = (1, 32, 256, 2048)
    """Up to a default step budget: a prefill step ships that many hidden states per layer."""
    repeats: int = 7
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in (
            "decode_batches",
            "decode_contexts",
            "ffn_tokens",
            "prefill_chunks",
            "step_batches",
            "transport_tokens",
        ):
            v = getattr(self, name)
            if len(v) < 2 or any(not isinstance(x, int) or x < 1 for x in v):
                raise UserInputError(f"profile grid {name} needs at least two integers >= 1")
        if any(not isinstance(x, int) or x < 0 for x in self.prefill_starts):
            raise UserInputError("profile grid prefill_starts must be integers >= 0")
        if not self.prefill_sequences or any(
            not isinstance(x, int) or x < 1 for x in self.prefill_sequences
        ):
            raise UserInputError("profile grid prefill_sequences must be integers >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise UserInputError("profile grid needs repeats >= 1 and warmup >= 0")


SMALL_GRID = ProfileGrid(
    decode_batches=(1, 4),
    decode_contexts=(32, 128),
    ffn_tokens=(1, 64, 512),
    prefill_chunks=(8, 32),
    prefill_starts=(0, 32),
    prefill_sequences=(1, 4),
    step_batches=(1, 4),
    transport_tokens=(1, 16),
    repeats=3,
    warmup=1,
)
"""For tests: a few seconds on a tiny model."""
