"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, version, metrics.

    app = build_app(engine, tokenizer, config, served_model_name="tiny", model_root=path)
    uvicorn.run(app)  # the app starts the engine thread on startup and stops it on shutdown

Each request is validated (400), routed to a served model name (404), admitted to the engine
(429 when its waiting queue is full, 503 when the engine is down), then answered as one JSON
body or as server-sent events (`data: {...}` per chunk, `data: [DONE]` last), tokens flushed as
the engine produces them. A watcher task listens for the client's disconnect and aborts the
request's engine work (KV blocks are freed at once), for streaming and non-streaming alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from afdserve import __version__
from afdserve.config import EngineConfig
from afdserve.errors import UserInputError
from afdserve.model.tokenizer import Tokenizer
from afdserve.server.async_engine import (
    AsyncEngine,
    EngineClient,
    GenerationOutput,
    RequestHandle,
    TokenLogprob,
)
from afdserve.server.errors import APIError, BadRequest, EngineDead, InternalError, NotFound
from afdserve.server.metrics import ServerMetrics
from afdserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)

log = logging.getLogger("afdserve.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServingState:
    """Everything the route handlers share (on `app.state.serving`)."""

    async_engine: AsyncEngine
    tokenizer: Tokenizer
    metrics: ServerMetrics
    config: EngineConfig
    model_name: str
    model_root: str
    vocab_size: int

    @property
    def max_model_len(self) -> int:
        return self.async_engine.max_model_len


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


def build_app(
    engine: EngineClient,
    tokenizer: Tokenizer,
    config: EngineConfig,
    served_model_name: str | None = None,
    model_root: str | Path | None = None,
    max_queue: int = 1024,
    vocab_size: int | None = None,
    sampling_defaults: dict[str, Any] | None = None,
) -> FastAPI:
    """The app serving `engine`; it owns the engine from startup on and closes it at shutdown."""
    model_name = served_model_name or config.model
    async_engine = AsyncEngine(
        engine, tokenizer, max_queue=max_queue, step_timeout_s=config.sync_timeout_s + 30.0
    )
    async_engine.sampling_defaults = dict(sampling_defaults or {})  # generation_config.json's
    metrics = ServerMetrics(
        model_name, config, state=lambda: engine.state(), healthy=lambda: async_engine.healthy
    )
    async_engine.observer = metrics
    vocab = min(
        tokenizer.vocab_size,
        vocab_size or engine.vocab_size,
    )
    state = ServingState(
        async_engine, tokenizer, metrics, config, model_name, str(model_root or config.model), vocab
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        log.info("serving %s (%s) on the engine thread", model_name, describe(config))
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(title="afdserve", version=__version__, lifespan=lifespan)
    app.state.serving = state
    _install_error_handlers(app)
    _add_routes(app, state)
    return app


def describe(cfg: EngineConfig) -> str:
    if cfg.is_afd:
        return f"AFD {cfg.attention_workers}A{cfg.ffn_workers}F, {cfg.microbatches} microbatches"
    return f"aggregated x{cfg.attention_workers}"


# ---- errors ------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(UserInputError)
    async def user_error(_: Request, exc: UserInputError) -> JSONResponse:
        err = BadRequest(str(exc))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail))
        err.status, err.type = (
            exc.status_code,
            "NotFoundError" if exc.status_code == 404 else "HTTPError",
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = InternalError(f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=err.status)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith(("str", "list", "int"))]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(loc) or "body"
        more = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
        raise BadRequest(f"{where}: {first['msg']}{more}", param=param) from None


# ---- routes ------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, st: ServingState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not st.async_engine.healthy:
            err = st.async_engine.error
            why = f"the engine failed: {err}" if err is not None else "a worker is down"
            e = EngineDead(why)
            return JSONResponse(e.body(), status_code=e.status)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(
            id=st.model_name,
            root=st.model_root,
            max_model_len=st.max_model_len,
            vocab_size=st.vocab_size,
        )
        return ModelList(data=[card])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        body.check_unsupported()
        _check_model(st, body.model)
        prompts = _completion_prompts(st, body.prompt)
        handles = _admit(st, body, prompts, body.max_tokens, body.logprobs)
        rid = handles[0][1].request_id.rsplit("-", 1)[0]
        if body.stream:
            return StreamingResponse(
                _stream_completion(st, request, body, rid, prompts, handles),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await _collect(request, [h for _, h in handles])
        choices = []
        n_prompt = n_out = 0
        for (pi, _), (text, ids, lps, reason) in zip(handles, results, strict=True):
            p = prompts[pi]
            choices.append(
                CompletionChoice(
                    index=len(choices),
                    text=text,
                    finish_reason=reason,
                    logprobs=_completion_logprobs(st, lps, 0)
                    if body.logprobs is not None
                    else None,
                    prompt_token_ids=p.token_ids if body.return_token_ids else None,
                    token_ids=ids if body.return_token_ids else None,
                )
            )
            n_out += len(ids)
        n_prompt = sum(len(p.token_ids) for p in prompts)
        resp = CompletionResponse(
            id=rid, model=st.model_name, choices=choices, usage=Usage.of(n_prompt, n_out)
        )
        return JSONResponse(resp.model_dump(mode="json"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        body.check_unsupported()
        _check_model(st, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = st.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt
        )
        prompt = _Prompt(text, st.tokenizer.encode(text))
        top = (body.top_logprobs or 0) if body.logprobs else None
        handles = _admit(st, body, [prompt], body.requested_max_tokens, top)
        rid = handles[0][1].request_id.rsplit("-", 1)[0]
        if body.stream:
            return StreamingResponse(
                _stream_chat(st, request, body, rid, prompt, handles),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await _collect(request, [h for _, h in handles])
        choices = []
        n_out = 0
        for i, (text_out, ids, lps, reason) in enumerate(results):
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatMessageOut(content=text_out),
                    finish_reason=reason,
                    logprobs=_chat_logprobs(st, lps) if body.logprobs else None,
                    prompt_token_ids=prompt.token_ids if body.return_token_ids else None,
                    token_ids=ids if body.return_token_ids else None,
                )
            )
            n_out += len(ids)
        resp = ChatCompletionResponse(
            id=rid,
            model=st.model_name,
            choices=choices,
            usage=Usage.of(len(prompt.token_ids), n_out),
        )
        return JSONResponse(resp.model_dump(mode="json"))


def _check_model(st: ServingState, model: str | None) -> None:
    if model is not None and model != st.model_name:
        raise NotFound(
            f"The model `{model}` does not exist; this server serves `{st.model_name}`.",
            param="model",
        )


def _completion_prompts(st: ServingState, prompt: Any) -> list[_Prompt]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise BadRequest("prompt must not be empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(_Prompt(item, st.tokenizer.encode(item)))
        else:
            out.append(_Prompt(None, list(item)))
    for p in out:
        if not p.token_ids:
            raise BadRequest("prompt must not be empty", param="prompt")
        bad = [t for t in p.token_ids if not 0 <= t < st.vocab_size]
        if bad:
            raise BadRequest(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {st.vocab_size})",
                param="prompt",
            )
    return out


def _admit(
    st: ServingState,
    body: Any,
    prompts: Sequence[_Prompt],
    max_tokens: int | None,
    logprobs: int | None,
) -> list[tuple[int, RequestHandle]]:
    """Check lengths, then add one engine request per (prompt, n); all or nothing."""
    limit = st.max_model_len
    plan = []
    for p in prompts:
        n = len(p.token_ids)
        if n >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; the prompt has {n} tokens, "
                "which leaves no room to generate. Please shorten the prompt.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        mt = max_tokens if max_tokens is not None else limit - n
        if n + mt > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the prompt, {mt} in the completion). Please reduce the "
                "length of the prompt or max_tokens.",
                param="max_tokens",
            )
        plan.append(mt)
    base = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{uuid.uuid4().hex}"
    ae = st.async_engine
    handles: list[tuple[int, RequestHandle]] = []
    try:
        for pi, (p, mt) in enumerate(zip(prompts, plan, strict=True)):
            for i in range(body.n):
                params = body.sampling_params(mt, logprobs, i, ae.sampling_defaults)
                handles.append((pi, ae.add_request(f"{base}-{len(handles)}", p.token_ids, params)))
    except BaseException:
        for _, h in handles:
            h.abort()
        raise
    return handles


async def _watch_disconnect(request: Request, handles: Sequence[RequestHandle]) -> None:
    """Abort every handle once the client disconnects (runs until cancelled)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            log.info("client disconnected; aborting %s", ", ".join(h.request_id for h in handles))
            for h in handles:
                h.abort()
            return


_Result = tuple[str, list[int], list[TokenLogprob], str | None]


async def _collect(request: Request, handles: Sequence[RequestHandle]) -> list[_Result]:
    async def one(h: RequestHandle) -> _Result:
        text, ids, lps, reason = [], [], [], None
        async for out in h:
            text.append(out.text)
            ids.extend(out.token_ids)
            lps.extend(out.logprobs or ())
            reason = out.finish_reason
        return "".join(text), ids, lps, reason

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


def _stream_completion(
    st: ServingState,
    request: Request,
    body: CompletionRequest,
    rid: str,
    prompts: list[_Prompt],
    handles: list[tuple[int, RequestHandle]],
) -> AsyncIterator[str]:
    created = int(time.time())
    offsets = [0] * len(handles)

    async def chunks() -> AsyncIterator[str]:
        n_out = 0
        async for i, out in _merged([h for _, h in handles]):
            n_out += len(out.token_ids)
            lps = None
            if body.logprobs is not None:
                lps = _completion_logprobs(st, out.logprobs or [], offsets[i])
                offsets[i] += sum(len(t) for t in lps.tokens)
            choice = CompletionChoice(
                index=i,
                text=out.text,
                logprobs=lps,
                finish_reason=out.finish_reason,
                token_ids=out.token_ids if body.return_token_ids else None,
            )
            yield _sse(
                CompletionChunk(id=rid, created=created, model=st.model_name, choices=[choice])
            )
        if body.include_usage:
            n_prompt = sum(len(prompts[pi].token_ids) for pi, _ in handles)
            usage = Usage.of(n_prompt, n_out)
            yield _sse(
                CompletionChunk(
                    id=rid, created=created, model=st.model_name, choices=[], usage=usage
                )
            )

    return _stream(request, [h for _, h in handles], chunks())


def _stream_chat(
    st: ServingState,
    request: Request,
    body: ChatCompletionRequest,
    rid: str,
    prompt: _Prompt,
    handles: list[tuple[int, RequestHandle]],
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _sse(
            ChatCompletionChunk(
                id=rid, created=created, model=st.model_name, choices=choices, usage=usage
            )
        )

    async def chunks() -> AsyncIterator[str]:
        for i in range(len(handles)):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        n_out = 0
        async for i, out in _merged([h for _, h in handles]):
            n_out += len(out.token_ids)
            choice = ChatChunkChoice(
                index=i,
                delta=ChatDelta(content=out.text),
                finish_reason=out.finish_reason,
                logprobs=_chat_logprobs(st, out.logprobs or []) if body.logprobs else None,
                token_ids=out.token_ids if body.return_token_ids else None,
            )
            yield chunk([choice])
        if body.include_usage:
            yield chunk([], Usage.of(len(prompt.token_ids) * len(handles), n_out))

    return _stream(request, [h for _, h in handles], chunks())


# ---- logprobs ----------------------------------------------------------------------------------


def _token_text(st: ServingState, token_id: int) -> str:
    return st.tokenizer.decode([token_id])


def _completion_logprobs(
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


def _chat_logprobs(st: ServingState, lps: Sequence[TokenLogprob]) -> ChatLogprobs:
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
