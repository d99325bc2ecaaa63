"""Plain data passed between the front ends, the scheduler and the model runners.

Nothing here imports torch: the scheduler is unit tested on CPU without a model by feeding it
hand-made `StepResult`s, and the planner/simulator never need torch at all.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from afdserve.errors import UserInputError


def _int_tuple(values: Sequence[int] | None, name: str) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)):
        raise UserInputError(f"{name} must be a list of integers, got a string")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserInputError(f"{name} must hold non-negative integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output (the vLLM/OpenAI meaning of each field)."""

    max_tokens: int = 16
    """Upper bound on generated tokens; at least 1."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables it."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens however requests are batched."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the request (finish reason "stop"); the token is kept."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the detokenized output by the front end (server)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token (benchmarks use this)."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token (and this many top alternatives)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token given the tokens before it (the first
    token has none), and this many top alternatives: delivered once, on the first token event."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise UserInputError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise UserInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise UserInputError(f"temperature must be a number, got {self.temperature!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise UserInputError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise UserInputError(
                f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise UserInputError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= 20
        ):
            raise UserInputError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool)
            or not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= 20
        ):
            raise UserInputError(
                f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}"
            )
        object.__setattr__(
            self, "stop_token_ids", _int_tuple(self.stop_token_ids, "stop_token_ids")
        )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise UserInputError("stop must be a non-empty string or a list of non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(enum.StrEnum):
    """Why a request ended (OpenAI's finish_reason values)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context length
    ABORT = "abort"  # cancelled by the client or the engine


@dataclass(frozen=True)
class Request:
    """One generation request as it enters an engine."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0
    sampling_seed: int = 0
    """The seed actually used: `params.seed` when given, else drawn by the engine at arrival."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _int_tuple(self.prompt_token_ids, "prompt"))
        if not self.prompt_token_ids:
            raise UserInputError("prompt must not be empty")


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step: feed `token_ids` at positions start_pos.. and maybe sample.

    The KV cache already holds `start_pos` tokens of this sequence; after the step it holds
    start_pos + len(token_ids). `block_table` lists the physical KV blocks that cover them all.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool
    """True when the chunk ends at the sequence's newest token, so a next token is sampled."""
    params: SamplingParams
    sampling_seed: int
    output_index: int
    """How many tokens this sequence has generated so far (the index of the token to sample)."""
    prompt_logprob_start: int = 0
    """The first row of this chunk whose next-token distribution scores a prompt token."""
    prompt_logprob_targets: tuple[int, ...] = ()
    """Prompt tokens to score: row `prompt_logprob_start + i` (position start_pos +
    prompt_logprob_start + i) gives the log-probability of `prompt_logprob_targets[i]`, the
    prompt token at the next position. Empty when the request asked for no prompt logprobs or
    every position in this chunk was scored already (a recompute after preemption)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler asks one runner to compute in one step."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[int, ...] = ()
    """Sequences preempted (their KV freed) while making this plan; informational."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SampledToken:
    """One sampled token for one sequence (the runner's answer for a chunk with sample=True)."""

    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token's log-probability given the tokens before it (raw model distribution,
    as for sampled tokens), its rank in that distribution (1 = the most likely) and the top
    alternatives asked for, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChunkPromptLogprobs:
    """The runner's prompt logprobs for one chunk: one per `prompt_logprob_targets` entry."""

    seq_id: int
    entries: tuple[PromptLogprob, ...]


@dataclass(frozen=True)
class StepResult:
    """The runner's answer to a StepPlan: a token for every chunk that asked for one, and the
    prompt logprobs of every chunk that had prompt tokens to score."""

    step_id: int
    sampled: tuple[SampledToken, ...]
    prompt_logprobs: tuple[ChunkPromptLogprobs, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What the scheduler reports per request after a step: the new token, and the end if any."""

    request_id: str
    token_id: int
    finished: bool
    finish_reason: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    """On a request's first event when it asked for prompt logprobs: one entry per prompt token
    after the first (positions 1..P-1, so empty for a one-token prompt); None on every other."""


@dataclass
class RequestStats:
    """Timestamps a front end fills in for metrics (seconds, time.monotonic)."""

    arrival: float = 0.0
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
