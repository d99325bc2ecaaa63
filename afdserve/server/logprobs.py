"""The engine's per-token log-probabilities in the two OpenAI shapes: the legacy completions
form (parallel lists with text offsets) and the chat form (one entry per token, with bytes).

Both the one-body answers and the streamed chunks format them, so they live apart from either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afdserve.server.async_engine import TokenLogprob
from afdserve.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)
from afdserve.server.state import ServingState


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
