"""EngineClient: the one interface `LLM` and the server drive an engine through.

Two implementations: the in-process `Engine` (launch/inprocess.py: every worker on a thread of
this process) and `MultiProcessEngine` (launch/multiproc.py: the front of worker processes).
`start_engine` (launch/start.py) picks one from the config; nothing above this layer asks which
it got.

Threads: `add_request`, `abort`, `owner`, `has_unfinished`, `state` and `healthy` are called
from the server's event loop while `step`/`poll_idle` run on its engine thread, so they are
thread-safe in both implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from afdserve.afd.stats import EngineState
from afdserve.types import SamplingParams, TokenEvent


class EngineClient(Protocol):
    @property
    def max_model_len(self) -> int:
        """The longest sequence every attention worker holds (prompt plus output)."""
        ...

    vocab_size: int
    """The model's vocabulary: token ids in [0, vocab_size) are valid prompts."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> int:
        """Admit (UserInputError for a request no worker could take) and route a request;
        returns the attention worker's index."""
        ...

    def abort(self, request_id: str) -> bool: ...

    def owner(self, request_id: str) -> int | None:
        """The attention worker serving `request_id` (None once finished or aborted)."""
        ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[TokenEvent]:
        """Token events of the next step(s); may raise when a worker failed."""
        ...

    def poll_idle(self) -> None:
        """Called about every 0.5 s while nothing is unfinished: an engine whose workers report
        over messages reads them (so `state` stays current and a dead worker is noticed); may
        raise, like `step`."""
        ...

    def state(self, afd: bool = True) -> EngineState: ...

    def healthy(self) -> bool:
        """False once the engine cannot serve (a worker died); the server then answers 503."""
        ...

    def drain(self, rank: int, drained: bool = True) -> int:
        """Route no new request to attention worker `rank`, or route to it again; returns the
        requests it holds (launch/drain.py). UserInputError for a bad rank or the last one."""
        ...

    def add_worker(self, rank: int | None = None) -> int:
        """Start an attention worker in a free slot (`max_attention_workers`); its rank.
        StateConflict when none is free (launch/multiproc.py); UserInputError in-process."""
        ...

    def remove_worker(self, rank: int, migrate: bool = False) -> int:
        """Stop attention worker `rank` (drained, holding nothing, unless `migrate`) and free
        its slot; the requests moved. StateConflict while it holds requests."""
        ...

    def problems(self) -> list[str]:
        """What is wrong while it still serves (a worker lost or stalled), one line each; []
        when nothing is. /health reports them as degraded."""
        ...

    def close(self) -> None: ...
