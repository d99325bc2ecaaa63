"""Getting admitted requests' outputs to the client: collected into one body, or streamed as
server-sent events (`data: {...}` per chunk, `data: [DONE]` last), tokens flushed as the
engine produces them.

Either way a watcher task listens for the client's disconnect and aborts the request's engine
work (KV blocks are freed at once), and every handle is aborted on the way out (a no-op for
finished ones). Once the headers are sent an error can only be reported in-band, as an error
event before [DONE]. Apart from the routes because this is asyncio plumbing, not the protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from pydantic import BaseModel

from afdserve.server.admission import Prompt
from afdserve.server.async_engine import GenerationOutput, RequestHandle, TokenLogprob
from afdserve.server.errors import APIError, InternalError
from afdserve.server.logprobs import chat_logprobs, completion_logprobs, echo_logprobs, joined
from afdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from afdserve.server.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    Usage,
)
from afdserve.server.state import ServingState
from afdserve.types import PromptLogprob

log = logging.getLogger("afdserve.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _watch_disconnect(request: Request, handles: Sequence[RequestHandle]) -> None:
    """Abort every handle once the client disconnects (runs until cancelled)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            log.info("client disconnected; aborting %s", ", ".join(h.request_id for h in handles))
            for h in handles:
                h.abort()
            return


Result = tuple[str, list[int], list[TokenLogprob], str | None, tuple[PromptLogprob, ...] | None]
"""One choice collected: (text, token ids, logprobs, finish reason, prompt logprobs)."""


async def collect(request: Request, handles: Sequence[RequestHandle]) -> list[Result]:
    async def one(h: RequestHandle) -> Result:
        text, ids, lps, reason, prompt_lps = [], [], [], None, None
        async for out in h:
            text.append(out.text)
            ids.extend(out.token_ids)
            lps.extend(out.logprobs or ())
            reason = out.finish_reason
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
        return "".join(text), ids, lps, reason, prompt_lps

    watcher = asyncio.ensure_future(_watch_disconnect(request, handles))
    try:
        return list(await asyncio.gather(*(one(h) for h in handles)))
    finally:
        watcher.cancel()
        for h in handles:
            h.abort()  # no-op for finished ones; frees the rest if another failed


async def _merged(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """(choice index, output) from every handle as they come."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for out in h:
                await queue.put((i, out))
            await queue.put((i, done))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def _stream(
    request: Request, handles: Sequence[RequestHandle], chunks: AsyncIterator[str]
) -> AsyncIterator[str]:
    """Wrap a chunk generator: watch for disconnects, turn errors into an error event, end
    with [DONE], and abort everything left if the client went away."""
    watcher = asyncio.ensure_future(_watch_disconnect(request, handles))
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield _sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
        log.exception("error while streaming")
        yield _sse(InternalError(f"internal error: {type(exc).__name__}: {exc}").body())
    finally:
        watcher.cancel()
        for h in handles:
            h.abort()
    yield "data: [DONE]\n\n"


def stream_completion(
    st: ServingState,
    request: Request,
    body: CompletionRequest,
    rid: str,
    prompts: list[Prompt],
    handles: list[tuple[int, RequestHandle]],
) -> AsyncIterator[str]:
    created = int(time.time())
    offsets = [0] * len(handles)
    echoed = [False] * len(handles)
    n_out = [0] * len(handles)

    async def chunks() -> AsyncIterator[str]:
        async for i, out in _merged([h for _, h in handles]):
            text, ids, gen_lps = out.text, out.token_ids, out.logprobs or []
            if body.echo_only:  # the prompt alone: the engine's one token is not returned
                text, ids, gen_lps = "", [], []
            lps = None
            if body.logprobs is not None:
                lps = completion_logprobs(st, gen_lps, 0)
            if body.echo and not echoed[i]:  # the first chunk of a choice leads with the prompt
                echoed[i] = True
                p = prompts[handles[i][0]]
                text = echo_text(st, p) + text
                if lps is not None:
                    lps = joined(
                        echo_logprobs(st, p.token_ids, out.prompt_logprobs, body.logprobs), lps
                    )
            if lps is not None:
                lps.text_offset = [offsets[i] + o for o in lps.text_offset]
                offsets[i] += sum(len(t) for t in lps.tokens)
            n_out[i] += len(ids)
            choice = CompletionChoice(
                index=i,
                text=text,
                logprobs=lps,
                finish_reason=out.finish_reason,
                token_ids=ids if body.return_token_ids else None,
            )
            usage = None
            if body.continuous_usage:  # this choice's usage so far (as vLLM)
                usage = Usage.of(len(prompts[handles[i][0]].token_ids), n_out[i])
            yield _sse(
                CompletionChunk(
                    id=rid, created=created, model=st.model_name, choices=[choice], usage=usage
                )
            )
        if body.include_usage:  # as the non-streamed answer: each prompt counts once
            usage = Usage.of(sum(len(p.token_ids) for p in prompts), sum(n_out))
            yield _sse(
                CompletionChunk(
                    id=rid, created=created, model=st.model_name, choices=[], usage=usage
                )
            )

    return _stream(request, [h for _, h in handles], chunks())


def echo_text(st: ServingState, prompt: Prompt) -> str:
    """The prompt as echoed: its text, or its token ids decoded (as vLLM does)."""
    return prompt.text if prompt.text is not None else st.tokenizer.decode(prompt.token_ids)


def stream_chat(
    st: ServingState,
    request: Request,
    body: ChatCompletionRequest,
    rid: str,
    prompt: Prompt,
    handles: list[tuple[int, RequestHandle]],
    echo: str = "",
) -> AsyncIterator[str]:
    """`echo`: text each choice starts with (chat `echo`), sent after the role chunk."""
    created = int(time.time())
    n_prompt = len(prompt.token_ids)
    n_out = [0] * len(handles)

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _sse(
            ChatCompletionChunk(
                id=rid, created=created, model=st.model_name, choices=choices, usage=usage
            )
        )

    def so_far(i: int) -> Usage | None:
        return Usage.of(n_prompt, n_out[i]) if body.continuous_usage else None

    async def chunks() -> AsyncIterator[str]:
        for i in range(len(handles)):
            role = ChatDelta(role="assistant", content="")
            yield chunk([ChatChunkChoice(index=i, delta=role)], so_far(i))
            if echo:
                yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=echo))], so_far(i))
        async for i, out in _merged([h for _, h in handles]):
            n_out[i] += len(out.token_ids)
            choice = ChatChunkChoice(
                index=i,
                delta=ChatDelta(content=out.text),
                finish_reason=out.finish_reason,
                logprobs=chat_logprobs(st, out.logprobs or []) if body.logprobs else None,
                token_ids=out.token_ids if body.return_token_ids else None,
            )
            yield chunk([choice], so_far(i))
        if body.include_usage:  # as the non-streamed answer: the prompt counts once
            yield chunk([], Usage.of(n_prompt, sum(n_out)))

    return _stream(request, [h for _, h in handles], chunks())
