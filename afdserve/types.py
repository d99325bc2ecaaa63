"""Plain data passed between the front ends, the scheduler and the model runners.

Nothing here imports torch: the scheduler is unit tested on CPU without a model by feeding it
hand-made `StepResult`s, and the planner/simulator never need torch at all.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
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


STRUCTURED_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")
"""What a `StructuredOutput` constrains the output to (vLLM's guided_* / structured_outputs)."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text, enforced as a logits mask each step
    (engine/structured.py). `spec` by kind: json_object "" (any JSON object); json_schema the
    schema as JSON text (a mapping is dumped); regex the pattern; choice a JSON list of the
    allowed strings (a list is dumped); grammar a Lark or GBNF grammar."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise UserInputError(
                f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                f"got {self.kind!r}"
            )
        spec = self.spec
        if self.kind == "json_schema" and isinstance(spec, Mapping):
            spec = json.dumps(spec)
        elif self.kind == "choice" and isinstance(spec, (list, tuple)):
            spec = json.dumps(list(spec))
        if not isinstance(spec, str):
            raise UserInputError(f"structured output {self.kind} spec must be a string")
        if self.kind == "choice":
            try:
                choices = json.loads(spec)
            except ValueError:
                choices = None
            if (
                not isinstance(choices, list)
                or not choices
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise UserInputError("choice must be a non-empty list of non-empty strings")
        elif self.kind != "json_object" and not spec:
            raise UserInputError(f"structured output {self.kind} needs a non-empty spec")
        object.__setattr__(self, "spec", spec)


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
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far (once), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Times each token's count among the generated tokens, subtracted from its logit, in
    [-2, 2]."""
    repetition_penalty: float = 1.0
    """vLLM's (and HF's): the logit of every token seen in the prompt or the output is divided
    by it when positive, multiplied by it otherwise; > 0, 1 disables it."""
    min_p: float = 0.0
    """Drop the tokens less likely than min_p times the most likely one (after temperature),
    in [0, 1]; 0 disables it."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot end the request before this many tokens were generated
    (their logits are masked until then); at most max_tokens."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """Token id -> bias added to its logit, in [-100, 100]; given as a mapping (or pairs),
    kept as (id, bias) pairs sorted by id."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token given the tokens before it (the first
    token has none), and this many top alternatives: delivered once, on the first token event."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar (a logits mask each
    step; the request ends with "stop" once the grammar is complete)."""

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
        self._check_logits_processing()

    def _check_logits_processing(self) -> None:
        """The penalties, min_p, min_tokens and logit_bias (normalised to floats and pairs)."""
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
            v = _number(getattr(self, name), name)
            if not lo <= v <= hi:
                raise UserInputError(f"{name} must be in [{lo:g}, {hi:g}], got {v}")
            object.__setattr__(self, name, v)
        rep = _number(self.repetition_penalty, "repetition_penalty")
        if not (math.isfinite(rep) and rep > 0.0):
            raise UserInputError(f"repetition_penalty must be a finite number > 0, got {rep}")
        object.__setattr__(self, "repetition_penalty", rep)
        min_p = _number(self.min_p, "min_p")
        if not 0.0 <= min_p <= 1.0:
            raise UserInputError(f"min_p must be in [0, 1], got {min_p}")
        object.__setattr__(self, "min_p", min_p)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise UserInputError(f"min_tokens must be an integer, got {self.min_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise UserInputError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise UserInputError(
                f"structured must be a StructuredOutput, got {type(self.structured).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling needs the sequence's token history (prompt and output tokens)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _number(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise UserInputError(f"{name} must be a number, got {v!r}")
    return float(v)


def _logit_bias(
    bias: Mapping[int, float] | Sequence[tuple[int, float]] | None,
) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if isinstance(bias, (str, bytes)):
        raise UserInputError("logit_bias must map token ids to biases, got a string")
    try:
        pairs = list(bias.items()) if isinstance(bias, Mapping) else [tuple(p) for p in bias]
    except TypeError:
        raise UserInputError(f"logit_bias must map token ids to biases, got {bias!r}") from None
    out: dict[int, float] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise UserInputError(f"logit_bias entries must be (token id, bias), got {pair!r}")
        tok, b = pair
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise UserInputError(f"logit_bias keys must be non-negative token ids, got {tok!r}")
        b = _number(b, f"logit_bias[{tok}]")
        if not -100.0 <= b <= 100.0:
            raise UserInputError(f"logit_bias[{tok}] must be in [-100, 100], got {b}")
        if tok in out:
            raise UserInputError(f"logit_bias gives token id {tok} twice")
        out[tok] = b
    return tuple(sorted(out.items()))


class FinishReason(enum.StrEnum):
    """Why a request ended (OpenAI's finish_reason values)."""

    STOP = "stop"  # EOS, a stop token id, a stop string or a completed structured output
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
    generated: tuple[int, ...] = ()
    """Tokens this request already generated on another attention worker, which died or
    stalled (a migration). They are fed again after the prompt, as a preemption's recompute
    feeds its outputs, and never emitted again; sampling continues at output index
    len(generated), so seeded sampling, penalties and max_tokens carry on where they were."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", _int_tuple(self.prompt_token_ids, "prompt"))
        object.__setattr__(self, "generated", _int_tuple(self.generated, "generated"))
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
    swap_out: tuple[tuple[int, int], ...] = ()
    """KV host tier: (device block, host slot) copies the runner makes before anything else
    in this step (cached blocks evicted from the device to make room; their device blocks are
    written by this very step)..."""
    swap_in: tuple[tuple[int, int], ...] = ()
    """...then (host slot, device block) copies: cached blocks brought back for a hit or a
    resume, read by this step's chunks (engine/prefix_cache.py)."""

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
    stop: bool = False
    """The sampler ends the sequence here (finish reason "stop"): its structured output's
    grammar is complete (or can take no further token)."""


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
    queue_s: float | None = field(default=None, compare=False)
    """On a request's first token only: seconds, on its attention worker's clock, from the
    scheduler taking the request in to first scheduling it (vLLM's queued interval). Timings
    are left out of `==`: the same tokens compare equal however long they took."""
    prefill_s: float | None = field(default=None, compare=False)
    """On a request's first token only: seconds from its first scheduling to this token's
    sampling (every prefill chunk, and any preemption between them, included)."""
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
