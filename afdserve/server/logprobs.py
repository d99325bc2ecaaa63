"""The engine's per-token log-probabilities in the two OpenAI shapes: the legacy completions
form (parallel lists with text offsets) and the chat form (one entry per token, with bytes);
and prompt logprobs in vLLM's shapes: an echoed prompt's share of the completions form
(`echo_logprobs`) and the `prompt_logprobs` extension field (`prompt_logprobs_out`).

Both the one-body answers and the streamed chunks format them, so they live apart from either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afdserve.server.async_engine import TokenLogprob
from afdserve.server.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobOut,
    PromptLogprobs,
    TopLogprob,
)
from afdserve.server.state import ServingState
from afdserve.types import PromptLogprob

LOGPROB_FLOOR = -9999.0
"""-inf logprobs are reported as this (JSON has no infinity; vLLM's and OpenAI's value)."""


def _clamp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _token_text(st: ServingState, token_id: int) -> str:
    return st.tokenizer.decode([token_id])


def completion_logprobs(
    st: ServingState, lps: Sequence[TokenLogprob], offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps:
        tok = _token_text(st, lp.token_id)
        out.tokens.append(tok)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({_token_text(st, t): v for t, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def echo_logprobs(
    st: ServingState,
    token_ids: Sequence[int],
    entries: Sequence[PromptLogprob] | None,
    num_top: int,
) -> CompletionLogprobs:
    """An echoed prompt's share of a completion's logprobs, as vLLM gives it: every prompt token
    with its text offset; the first has a null logprob and null top_logprobs; each other its
    logprob and top_logprobs of the prompt token, then its alternatives, num_top + 1 at most.
    `entries` are the engine's prompt logprobs (positions 1..P-1)."""
    if entries is None or len(entries) != len(token_ids) - 1:
        raise ValueError(f"prompt logprobs for {len(token_ids)} prompt tokens are missing")
    out = CompletionLogprobs()
    offset = 0
    for i, token_id in enumerate(token_ids):
        tok = _token_text(st, token_id)
        out.tokens.append(tok)
        out.text_offset.append(offset)
        offset += len(tok)
        if i == 0:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        e = entries[i - 1]
        ranked = {e.token_id: e.logprob} | {t: v for t, v in e.top_logprobs if t != e.token_id}
        out.token_logprobs.append(_clamp(e.logprob))
        out.top_logprobs.append(
            {_token_text(st, t): _clamp(v) for t, v in list(ranked.items())[: num_top + 1]}
        )
    return out


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """`then` (whose offsets start at 0) after `first`: one list of tokens, offsets running on."""
    base = sum(len(t) for t in first.tokens)
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=(first.top_logprobs or []) + (then.top_logprobs or []),
        text_offset=first.text_offset + [base + o for o in then.text_offset],
    )


def prompt_logprobs_out(st: ServingState, entries: Sequence[PromptLogprob]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` field: None for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}}, the prompt token first, then its alternatives
    (ranks 1, 2, ...)."""
    out: PromptLogprobs = [None]
    for e in entries:
        d = {str(e.token_id): _logprob_out(st, e.token_id, e.logprob, e.rank)}
        for rank, (t, v) in enumerate(e.top_logprobs, 1):
            d[str(t)] = _logprob_out(st, t, v, rank)
        out.append(d)
    return out


def _logprob_out(st: ServingState, token_id: int, logprob: float, rank: int) -> PromptLogprobOut:
    return PromptLogprobOut(
        logprob=_clamp(logprob), rank=rank, decoded_token=_token_text(st, token_id)
    )


def chat_logprobs(st: ServingState, lps: Sequence[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = st.tokenizer.token_bytes(token_id)
        return {
            "token": _token_text(st, token_id),
            "logprob": logprob,
            "bytes": list(raw) if raw is not None else None,
        }

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob),
                top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top],
            )
            for lp in lps
        ]
    )
