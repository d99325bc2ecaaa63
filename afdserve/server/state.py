"""What the API's route handlers share: one `ServingState` per app, on `app.state.serving`.

It lives apart from `api.py` so that the admission, streaming and logprob modules (and tests)
can take it without importing the app that wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass

from afdserve.config import EngineConfig
from afdserve.model.tokenizer import Tokenizer
from afdserve.server.async_engine import AsyncEngine
from afdserve.server.metrics import ServerMetrics


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
