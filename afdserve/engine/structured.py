"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) as a logits mask.

Legend: N = rows of the step's logits, S = rows with a structured output, V = vocabulary,
B = bytes of one row's bitmask (4 * ceil(V / 32)).

The grammar library is llguidance (what vLLM's "guidance" backend uses). A request's
`SamplingParams.structured` (types.py) names the kind and carries the spec as text, so it
crosses worker processes inside AddRequest; `grammar_of` turns it into an llguidance grammar
and `check` validates it without a tokenizer (the front's admission does, so a bad grammar is
a 400 before any worker sees it; the worker compiles it again for its tokenizer).

JSON (json_object, json_schema) is generated without free whitespace: the separators are
", " and ": " (Python's json.dumps), so a small model cannot pad the output with endless
spaces or newlines, and a top-level object ends the output at its closing brace (as vLLM's
`disable_any_whitespace`, with readable separators).

Per sequence, the state is an `LLMatcher`, kept here in the attention worker's `Grammars`
(like the penalties' `TokenHistory`): made at the sequence's first sample, advanced by each
token sampled for it and by nothing else, so a recompute after a preemption (which re-feeds
the prompt and the outputs) leaves it as it was; dropped once the scheduler no longer holds the
sequence (`retain`). Before sampling, each structured row's disallowed tokens get -inf (the
raw logits, and so logprobs, are untouched). The model's EOS ids are allowed exactly when the
grammar is in an accepting state (llguidance's own EOS rule), as are the request's
stop_token_ids. After sampling, the matcher consumes the token; once it is stopped (the
grammar can take no further token: a closed JSON object, a choice made) the sampler marks the
token `stop`, and the scheduler ends the request with finish reason "stop".

The mask depends only on the sequence's own matcher, so a request gives the same tokens
however it is batched, in-process or over worker processes.

The worker builds llguidance's tokenizer from the model directory's tokenizer.json once, at
its first structured request (`_ll_tokenizer`, shared by the in-process workers of one
model). A sequence whose matcher cannot be built on the worker (no tokenizer.json there, a
grammar this tokenizer cannot serve: the front checks both, so this is a misconfiguration) is
logged, sampled once without a mask and ended.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from afdserve.engine.sequence_state import PerSequence
from afdserve.errors import UserInputError
from afdserve.types import ScheduledChunk, StructuredOutput

log = logging.getLogger("afdserve.structured")

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "key_separator": ": ",
    "item_separator": ", ",
}
"""llguidance's JSON compile options for every JSON kind (see the module docstring)."""


def grammar_of(spec: StructuredOutput) -> str:
    """The llguidance grammar of `spec` (UserInputError when the spec cannot even be read)."""
    import llguidance

    try:
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', overrides=JSON_OPTIONS
            )
        if spec.kind == "json_schema":
            try:
                schema = json.loads(spec.spec)
            except ValueError as exc:
                raise UserInputError(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise UserInputError("json_schema must be a JSON object")
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", spec.spec)
        return llguidance.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(f"structured output ({spec.kind}): {exc}") from None


@functools.lru_cache(maxsize=256)
def check(spec: StructuredOutput) -> None:
    """UserInputError unless `spec` compiles (checked without a tokenizer; valid specs are
    remembered, so a client repeating its schema pays once)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar_of(spec))
    if error:
        raise UserInputError(f"structured output ({spec.kind}) does not compile: {error.strip()}")


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(path: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> Any:
    import llguidance

    return llguidance.LLTokenizer(
        Path(path).read_text(encoding="utf-8"),
        n_vocab=vocab_size,
        eos_token=list(eos_token_ids) or None,
    )


class _Failed:
    """Stands in for the matcher of a sequence whose grammar could not be built here."""


class Grammars(PerSequence[Any]):
    """Per-sequence grammar state of one attention worker's structured sequences (see the
    module docstring). Used by one thread: the one that runs the worker's steps."""

    def __init__(
        self, tokenizer_file: str | Path | None, vocab_size: int, eos_token_ids: Collection[int]
    ) -> None:
        super().__init__()
        self.tokenizer_file = None if tokenizer_file is None else Path(tokenizer_file)
        self.vocab_size = vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(int(t) for t in eos_token_ids))

    def tokenizer(self) -> Any:
        """llguidance's tokenizer of the model (built at the first call, then cached)."""
        path = self.tokenizer_file
        if path is None or not path.is_file():
            raise UserInputError(
                f"structured outputs need the model's tokenizer.json, and {path} is missing"
            )
        return _ll_tokenizer(str(path), self.vocab_size, self.eos_token_ids)

    def mask_(self, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]) -> None:
        """Set the disallowed tokens of every structured row of `logits` [N, V] to -inf, in
        place (the caller passes its own copy: the raw logits stay as they are)."""
        rows, masks = [], []
        for i, c in enumerate(chunks):
            if c.params.structured is None:
                continue
            m = self._matcher(c)
            if isinstance(m, _Failed):
                continue
            bits = bytearray(m.compute_bitmask())
            if m.is_accepting():  # the request's own stop tokens end it like an EOS
                for t in c.params.stop_token_ids:
                    if t < 8 * len(bits):
                        bits[t >> 3] |= 1 << (t & 7)
            rows.append(i)
            masks.append(bits)
        if not rows:
            return
        n, vocab = logits.shape
        packed = torch.frombuffer(bytearray().join(masks), dtype=torch.uint8)
        packed = packed.view(len(rows), -1)  # [S, B]: token 8k + j is bit j of byte k
        shifts = torch.arange(8, dtype=torch.uint8)
        allowed = ((packed.unsqueeze(2) >> shifts) & 1).flatten(1).bool()  # [S, 8B]
        if allowed.shape[1] < vocab:  # ids past the grammar's vocabulary are never allowed
            pad = torch.zeros(len(rows), vocab - allowed.shape[1], dtype=torch.bool)
            allowed = torch.cat([allowed, pad], dim=1)
        allowed = allowed[:, :vocab].to(logits.device)  # [S, V]
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

    def record(self, chunks: Sequence[ScheduledChunk], tokens: Sequence[int]) -> list[bool]:
        """Advance each structured sequence's matcher by its sampled token; per chunk, whether
        that token ends the sequence (the grammar is complete, or could not be followed)."""
        out = []
        for c, t in zip(chunks, tokens, strict=True):
            if c.params.structured is None:
                out.append(False)
                continue
            m = self._matcher(c)
            if isinstance(m, _Failed):
                out.append(True)
                continue
            if m.is_accepting() and (t in self.eos_token_ids or t in c.params.stop_token_ids):
                out.append(True)  # an EOS or stop token after a complete output
                continue
            if not m.consume_token(t):
                log.error(
                    "sequence %d: the grammar refused sampled token %d (%s); ending it",
                    c.seq_id,
                    t,
                    m.get_error(),
                )
                out.append(True)
                continue
            out.append(m.is_stopped())
        return out

    def resume(self, seq_id: int, params: Any, generated: Sequence[int]) -> None:
        """The grammar state of a migrated sequence, which generated `generated` elsewhere:
        a new matcher advanced by those tokens, as the first worker's was."""
        if params.structured is None:
            return
        m = self._seqs[seq_id] = self._new_matcher(seq_id, params.structured)
        for t in generated:
            if isinstance(m, _Failed) or not m.consume_token(t):
                log.error("sequence %d: its grammar refuses the tokens it had generated", seq_id)
                self._seqs[seq_id] = _Failed()
                return

    def _matcher(self, c: ScheduledChunk) -> Any:
        m = self._seqs.get(c.seq_id)
        if m is not None:
            return m
        if c.output_index:
            raise RuntimeError(
                f"sequence {c.seq_id}: no grammar state, yet it has {c.output_index} outputs"
            )
        assert c.params.structured is not None
        m = self._seqs[c.seq_id] = self._new_matcher(c.seq_id, c.params.structured)
        return m

    def _new_matcher(self, seq_id: int, spec: Any) -> Any:
        import llguidance

        try:
            m = llguidance.LLMatcher(self.tokenizer(), grammar_of(spec), log_level=0)
            if m.is_error():
                raise UserInputError(m.get_error())
        except (UserInputError, OSError) as exc:
            log.error(
                "sequence %d: its structured output (%s) cannot be enforced here: %s; "
                "sampling one token unconstrained and ending it",
                seq_id,
                spec.kind,
                exc,
            )
            m = _Failed()
        return m
