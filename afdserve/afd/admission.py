"""Admission: the one check a request gets on its way in, at the front that routes it.

Both fronts (the in-process engine and the multi-process one) admit through `admit`, before
routing, so a request a worker could not take is refused synchronously with a clear message
(a remote worker's refusal would only come back later). The limits are the workers' own:
`max_model_len` is what an attention worker reports it can hold (the context, or its KV cache
when that is smaller), so a request admitted here is never refused by a scheduler.
"""

from __future__ import annotations

import random
import time
from collections.abc import Container, Sequence
from pathlib import Path

from afdserve.errors import UserInputError
from afdserve.types import Request, SamplingParams


def admit(
    request_id: str,
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    arrival_time: float | None,
    *,
    vocab_size: int,
    max_model_len: int,
    rng: random.Random,
    live: Container[str] = (),
    tokenizer_file: Path | None = None,
) -> Request:
    """The Request to route, with its sampling seed drawn when `params` brings none; a
    UserInputError naming the problem for an empty prompt, a token id outside the vocabulary
    (in the prompt or in logit_bias), a prompt longer than the workers hold, or a structured
    output that does not compile or that the model cannot serve (it needs `tokenizer_file`,
    the model's tokenizer.json, which the workers read), or an id already in `live` (the
    caller's table of the requests it serves)."""
    if not isinstance(request_id, str) or not request_id:
        raise UserInputError(f"request id must be a non-empty string, got {request_id!r}")
    if request_id in live:
        raise UserInputError(f"duplicate request id {request_id!r}")
    ids = Request(request_id, prompt_token_ids, params).prompt_token_ids  # non-negative ints
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise UserInputError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    bad = next((t for t, _ in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise UserInputError(
            f"logit_bias token id {bad} is outside the vocabulary [0, {vocab_size})"
        )
    if len(ids) > max_model_len:
        raise UserInputError(
            f"prompt has {len(ids)} tokens but the context length is {max_model_len}"
        )
    if params.structured is not None:
        if tokenizer_file is None or not Path(tokenizer_file).is_file():
            where = (
                "the model" if tokenizer_file is None else repr(str(Path(tokenizer_file).parent))
            )
            raise UserInputError(
                f"structured outputs need the model's tokenizer.json, and {where} has none"
            )
        from afdserve.engine.structured import check

        check(params.structured)
    seed = params.seed if params.seed is not None else rng.getrandbits(63)  # refused: no draw
    arrival = time.monotonic() if arrival_time is None else arrival_time
    return Request(request_id, ids, params, arrival, seed)
