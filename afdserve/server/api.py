"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, tokenizer, health, ping,
version, metrics.

    app = build_app(engine, tokenizer, config, served_model_name="tiny", model_root=path)
    uvicorn.run(app)  # the app starts the engine thread on startup and stops it on shutdown

Each request is validated (400), routed to a served model name (404), admitted to the engine
(429 with Retry-After when --max-queue requests wait beyond the batch slots, 503 when the
engine is down or the server drains), then answered as one JSON
body or as server-sent events (`data: {...}` per chunk, `data: [DONE]` last), tokens flushed as
the engine produces them. A watcher task listens for the client's disconnect and aborts the
request's engine work (KV blocks are freed at once), for streaming and non-streaming alike.

The event loop only moves bytes: tokenising prompts, rendering chat templates and validating
large bodies run on a few tokenizer threads (`ServingState.off_loop`), so a 2 MB prompt does
not stall every other stream or /health; the engine's calls (adds, aborts, the state /metrics
reads) run on its own few threads (`engine_calls`), so a worker process slow to read its
control socket does not either. A body over --max-request-bytes is a 413 before it is read,
JSON nested too deeply a 400, and a text prompt that cannot fit the context is refused before
it is tokenised.

This module wires the app and holds the routes and error handlers; the parts live beside it:
`state` (the `ServingState` the handlers share, `FrontOptions`), `admission` (model check,
prompts, chat rendering, lengths, adding engine requests), `streaming` (collecting or
streaming outputs, disconnect watching), `logprobs` (the two OpenAI logprob shapes),
`tokenization` (/tokenize, /detokenize, /tokenizer_info), `auth` (--api-key on /v1).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from afdserve import __version__
from afdserve.config import EngineConfig
from afdserve.errors import StateConflict, UserInputError
from afdserve.model.tokenizer import Tokenizer
from afdserve.server import tokenization
from afdserve.server.admission import admit, chat_prompt, check_model, completion_prompts
from afdserve.server.async_engine import AsyncEngine, EngineClient
from afdserve.server.auth import APIKeyMiddleware
from afdserve.server.errors import (
    APIError,
    BadRequest,
    Conflict,
    EngineDead,
    InternalError,
    NotFound,
    PayloadTooLarge,
)
from afdserve.server.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    joined,
    prompt_logprobs_out,
)
from afdserve.server.metrics import ServerMetrics
from afdserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from afdserve.server.responses import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from afdserve.server.state import FrontOptions, ServingState
from afdserve.server.streaming import (
    SSE_HEADERS,
    collect,
    echo_text,
    stream_chat,
    stream_completion,
)
from afdserve.server.structured import message_fields, stream_chat_tools, tool_mode

__all__ = ["SSE_HEADERS", "FrontOptions", "ServingState", "build_app", "describe"]

log = logging.getLogger("afdserve.server")


def build_app(
    engine: EngineClient,
    tokenizer: Tokenizer,
    config: EngineConfig,
    served_model_name: str | None = None,
    model_root: str | Path | None = None,
    max_queue: int = 1024,
    vocab_size: int | None = None,
    sampling_defaults: dict[str, Any] | None = None,
    legacy_metric_names: bool = False,
    options: FrontOptions | None = None,
) -> FastAPI:
    """The app serving `engine`; it owns the engine from startup on and closes it at shutdown."""
    options = options or FrontOptions()
    model_name = served_model_name or config.model
    async_engine = AsyncEngine(
        engine,
        tokenizer,
        max_queue=max_queue,
        step_timeout_s=config.sync_timeout_s + 30.0,
        max_num_seqs=config.max_num_seqs,
    )
    async_engine.sampling_defaults = dict(sampling_defaults or {})  # generation_config.json's
    metrics = ServerMetrics(
        model_name,
        config,
        state=lambda: engine.state(),
        healthy=lambda: async_engine.healthy,
        max_model_len=engine.max_model_len,
        legacy_names=legacy_metric_names,
    )
    async_engine.observer = metrics
    vocab = min(
        tokenizer.vocab_size,
        vocab_size or engine.vocab_size,
    )
    executor = ThreadPoolExecutor(
        max_workers=max(1, options.tokenizer_threads), thread_name_prefix="afdserve-tokenizer"
    )
    state = ServingState(
        async_engine,
        tokenizer,
        metrics,
        config,
        model_name,
        str(model_root or config.model),
        vocab,
        options=options,
        executor=executor,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        log.info("serving %s (%s) on the engine thread", model_name, describe(config))
        try:
            yield
        finally:
            await async_engine.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="afdserve", version=__version__, lifespan=lifespan)
    app.state.serving = state
    metrics.instrument(app)
    if options.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=list(options.api_keys))
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
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(UserInputError)
    async def user_error(_: Request, exc: UserInputError) -> JSONResponse:
        err = Conflict(str(exc)) if isinstance(exc, StateConflict) else BadRequest(str(exc))
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


OFF_LOOP_PARSE_BYTES = 64 * 1024
"""Bodies at least this large are parsed and validated on a tokenizer thread."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes: by its Content-Length before reading any,
    else as soon as what arrived goes over."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(
        f"the request body is larger than this server takes ({limit} bytes; see "
        "--max-request-bytes)"
    )
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _validate(raw: bytes, schema: type[BaseModel] | None) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 100 000 nested lists: refused, not a 500
        raise BadRequest("the request body's JSON is nested too deeply") from None
    if schema is None:  # /tokenize: prompt or messages, chosen by what the body holds
        is_chat = isinstance(data, dict) and "messages" in data
        schema = TokenizeChatRequest if is_chat else TokenizeCompletionRequest
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith(("str", "list", "int"))]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(loc) or "body"
        more = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
        raise BadRequest(f"{where}: {first['msg']}{more}", param=param) from None


async def _parse(st: ServingState, request: Request, schema: type[BaseModel] | None) -> Any:
    raw = await _read_body(request, st.options.max_request_bytes)
    if len(raw) >= OFF_LOOP_PARSE_BYTES:
        return await st.off_loop(_validate, raw, schema)
    return _validate(raw, schema)


# ---- routes ------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, st: ServingState) -> None:
    async def health() -> Response:
        if not st.async_engine.healthy:
            err = st.async_engine.error
            why = f"the engine failed: {err}" if err is not None else "a worker is down"
            if st.async_engine.draining:  # a load balancer should stop sending here
                why = "the server is shutting down"
            e = EngineDead(why)
            return JSONResponse(e.body(), status_code=e.status)
        problems = st.async_engine.problems
        if problems:  # serving, but with fewer workers than it should: say what and why
            return JSONResponse({"status": "degraded", "problems": problems}, status_code=200)
        return Response(status_code=200)

    app.add_api_route("/health", health, methods=["GET"])
    # SageMaker's health check: the same answer, GET or POST (as vLLM)
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    # -- operations: which attention workers take new requests (guarded by --api-key) --------

    @app.get("/admin/workers")
    async def workers() -> dict[str, Any]:
        engine = st.async_engine.engine
        state = await asyncio.to_thread(engine.state, False)
        return {
            "attention": [
                {"rank": w.index, "running": w.num_running, "waiting": w.num_waiting}
                for w in state.workers
            ],
            "ffn_workers_down": state.ffn_workers_down,
            "ffn_failovers": state.ffn_failovers,
            "problems": await asyncio.to_thread(engine.problems),
        }

    async def _drain(rank: int, drained: bool) -> dict[str, Any]:
        held = await asyncio.to_thread(st.async_engine.engine.drain, rank, drained)
        return {"rank": rank, "drained": drained, "requests": held}

    @app.post("/admin/attention_workers/{rank}/drain")
    async def drain(rank: int) -> dict[str, Any]:
        return await _drain(rank, True)

    @app.post("/admin/attention_workers/{rank}/resume")
    async def resume(rank: int) -> dict[str, Any]:
        return await _drain(rank, False)

    @app.post("/admin/attention_workers")
    async def add_worker(rank: int | None = None) -> dict[str, Any]:
        """Start an attention worker in a free slot of --max-attention-workers (the lowest, or
        `?rank=K`); it serves once ready (it is listed as joining until then)."""
        k = await asyncio.to_thread(st.async_engine.engine.add_worker, rank)
        return {"rank": k, "added": True}

    @app.delete("/admin/attention_workers/{rank}")
    async def remove_worker(rank: int, migrate: bool = False) -> dict[str, Any]:
        """Stop attention worker `rank` and free its slot: drain it first and wait until it
        holds no request (409 otherwise), or `?migrate=true` to move what it holds."""
        moved = await asyncio.to_thread(st.async_engine.engine.remove_worker, rank, migrate)
        return {"rank": rank, "removed": True, "requests_moved": moved}

    def card() -> ModelCard:
        return ModelCard(
            id=st.model_name,
            root=st.model_root,
            max_model_len=st.max_model_len,
            vocab_size=st.vocab_size,
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        if model_id != st.model_name:
            raise NotFound(f"The model `{model_id}` does not exist.", param="model")
        return card()

    @app.get("/metrics")
    async def metrics() -> Response:
        # the scrape reads engine.state(), which waits for a multi-process engine's lock
        text = await st.async_engine.calls.run(generate_latest, st.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await _parse(st, request, None)
        if isinstance(body, TokenizeChatRequest):
            body.check_unsupported()
        check_model(st, body.model)
        resp = await st.off_loop(tokenization.tokenize, st, body)
        return JSONResponse(resp.model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body: DetokenizeRequest = await _parse(st, request, DetokenizeRequest)
        check_model(st, body.model)
        resp = await st.off_loop(tokenization.detokenize, st, body)
        return JSONResponse(resp.model_dump(mode="json"))

    if st.options.enable_tokenizer_info_endpoint:

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> Response:
            return JSONResponse(await st.off_loop(tokenization.tokenizer_info, st))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(st, request, CompletionRequest)
        body.check_unsupported()
        check_model(st, body.model)
        prompts = await st.off_loop(completion_prompts, st, body.prompt, body.add_special_tokens)
        handles = await admit(
            st,
            body,
            prompts,
            body.engine_max_tokens,
            body.logprobs,
            prompt_logprobs=body.engine_prompt_logprobs,
        )
        rid = handles[0][1].request_id.rsplit("-", 1)[0]
        if body.stream:
            return StreamingResponse(
                stream_completion(st, request, body, rid, prompts, handles),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await collect(request, [h for _, h in handles])
        choices = []
        n_prompt = n_out = 0
        for (pi, _), (text, ids, lps, reason, prompt_lps) in zip(handles, results, strict=True):
            p = prompts[pi]
            if body.echo_only:  # the prompt alone: the engine's one token is not returned
                text, ids, lps = "", [], []
            logprobs = completion_logprobs(st, lps, 0) if body.logprobs is not None else None
            if body.echo:
                text = echo_text(st, p) + text
                if logprobs is not None:
                    prompt_part = echo_logprobs(st, p.token_ids, prompt_lps, body.logprobs)
                    logprobs = joined(prompt_part, logprobs)
            choices.append(
                CompletionChoice(
                    index=len(choices),
                    text=text,
                    finish_reason=reason,
                    logprobs=logprobs,
                    prompt_token_ids=p.token_ids if body.return_token_ids else None,
                    token_ids=ids if body.return_token_ids else None,
                    prompt_logprobs=(
                        prompt_logprobs_out(st, prompt_lps) if prompt_lps is not None else None
                    ),
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
        body: ChatCompletionRequest = await _parse(st, request, ChatCompletionRequest)
        body.check_unsupported()
        check_model(st, body.model)
        tools = tool_mode(body)
        prompt = await st.off_loop(chat_prompt, st, body)
        # echo (vLLM): the answer starts with the last message when it is the assistant's
        last = body.messages[-1]
        echo = last.text() if body.echo and last.role == "assistant" else ""
        top = (body.top_logprobs or 0) if body.logprobs else None
        handles = await admit(
            st, body, [prompt], body.requested_max_tokens, top, body.prompt_logprobs
        )
        rid = handles[0][1].request_id.rsplit("-", 1)[0]
        if body.stream:
            return StreamingResponse(
                stream_chat_tools(st, request, body, rid, prompt, handles, tools)
                if tools
                else stream_chat(st, request, body, rid, prompt, handles, echo),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await collect(request, [h for _, h in handles])
        choices = []
        n_out = 0
        for i, (text_out, ids, lps, reason, _) in enumerate(results):
            content, calls, reason = message_fields(body, tools, echo + text_out, reason)
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatMessageOut(content=content, tool_calls=calls),
                    finish_reason=reason,
                    logprobs=chat_logprobs(st, lps) if body.logprobs else None,
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
            prompt_logprobs=(
                prompt_logprobs_out(st, results[0][4]) if results[0][4] is not None else None
            ),
        )
        return JSONResponse(resp.model_dump(mode="json"))
