"""What the API's route handlers share: one `ServingState` per app, on `app.state.serving`.

It lives apart from `api.py` so that the admission, streaming and logprob modules (and tests)
can take it without importing the app that wires them together.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from afdserve.config import EngineConfig
from afdserve.model.tokenizer import Tokenizer
from afdserve.server.async_engine import AsyncEngine
from afdserve.server.metrics import ServerMetrics

T = TypeVar("T")

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FrontOptions:
    """How the HTTP front behaves, apart from the engine (the `serve` flags of the same names)."""

    api_keys: tuple[str, ...] = ()
    """When set, every /v1 route needs `Authorization: Bearer KEY` with one of them (401)."""
    chat_template: str | None = None
    """A Jinja chat template used instead of the model's (the text, not a path)."""
    trust_request_chat_template: bool = False
    """Let a request bring its own `chat_template` (else a 400, as vLLM)."""
    enable_tokenizer_info_endpoint: bool = False
    """Serve GET /tokenizer_info (off by default, as vLLM: it shows the tokenizer's config)."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Largest request body; a larger one is a 413 before it is read."""
    tokenizer_threads: int = 2
    """Threads that tokenise and render chat templates, off the event loop."""
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    """After SIGTERM (or Ctrl-C), how long requests in flight may take to finish before they
    are cut with a 503; new ones get 503 meanwhile (server/drain.py). 0 cuts at once."""


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
    options: FrontOptions = field(default_factory=FrontOptions)
    executor: ThreadPoolExecutor | None = None
    """Where tokenisation and template rendering run (None: the loop's default executor)."""

    @property
    def max_model_len(self) -> int:
        return self.async_engine.max_model_len

    @property
    def chat_template(self) -> str:
        """The template chat requests render with: --chat-template, else the model's."""
        return self.options.chat_template or self.tokenizer.chat_template

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking CPU work (tokenising a long prompt, rendering a template) on the
        tokenizer threads, so that the event loop keeps serving every other request."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))
