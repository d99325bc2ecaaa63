"""`LLM`: offline batched generation, the Python entry point (vLLM's `LLM` shape).

from afdserve import LLM, SamplingParams
llm = LLM(model="builtin:tiny-qwen3-moe", mode="afd", attention_workers=2, microbatches=2)
outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))

As vLLM's: `generate` without params samples with the model's generation_config.json defaults
(`get_default_sampling_params`); a directory without tokenizer files, or
`skip_tokenizer_init=True`, serves token-id prompts only, with outputs of token ids and empty
text; ids past the tokenizer's vocabulary (a padded model vocabulary) decode to no text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from afdserve.config import EngineConfig
from afdserve.errors import UserInputError
from afdserve.types import FinishReason, PromptLogprob, SamplingParams

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability, its rank (1 = the most likely) and its text (vLLM's)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """With `SamplingParams.prompt_logprobs`: per prompt token, None for the first, then
    {the prompt token: its Logprob, then the top alternatives', most likely first} (vLLM's)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LLM:
    """An engine (in-process or worker processes, by `transport`) plus its tokenizer. Options
    are EngineConfig's fields (`skip_tokenizer_init` among them)."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        from afdserve.launch.start import start_engine
        from afdserve.model.config import ModelConfig
        from afdserve.model.tokenizer import load_tokenizer

        if model is not None:
            options["model"] = model
        unknown = set(options) - {f.name for f in dataclasses.fields(EngineConfig)}
        if unknown:
            raise UserInputError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(**options)
        self.engine, path = start_engine(self.config)  # in-process, or a process per worker
        try:
            self.tokenizer = load_tokenizer(
                path, self.engine.vocab_size, self.config.skip_tokenizer_init
            )
            self.model_config = ModelConfig.from_dir(path)
        except BaseException:
            self.engine.close()
            raise
        self._counter = 0
        self.last_stats: dict[str, float] = {}

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` samples with when given no params: SamplingParams' defaults, with the
        temperature, top_p, top_k and max_new_tokens (as max_tokens) the model's
        generation_config.json sets (vLLM's `generation_config="auto"`)."""
        from afdserve.model.config import sampling_params_with

        return sampling_params_with(SamplingParams(), self.model_config.sampling_defaults)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); one SamplingParams or one per prompt
        (None: `get_default_sampling_params()`). Text prompts and stop strings need a tokenizer;
        a stop string ends its request where it matched, its text cut before it (vLLM's)."""
        from afdserve.model.text_stream import TextStream
        from afdserve.model.tokenizer import NoTokenizer, with_tokenizer_eos

        prompt_list = _as_prompt_list(prompts)
        if params is None:
            params = self.get_default_sampling_params()
        param_list = (
            [params] * len(prompt_list) if isinstance(params, SamplingParams) else list(params)
        )
        if len(param_list) != len(prompt_list):
            raise UserInputError(
                f"got {len(param_list)} SamplingParams for {len(prompt_list)} prompts"
            )
        outputs: dict[str, RequestOutput] = {}
        order: list[str] = []
        streams: dict[str, TextStream] = {}
        """Requests with stop strings: their text, cut where one matched (as vLLM's)."""
        try:
            for prompt, p in zip(prompt_list, param_list, strict=True):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                if not ids:
                    raise UserInputError("prompt must not be empty")
                if p.stop and isinstance(self.tokenizer, NoTokenizer):
                    raise self.tokenizer.unavailable("stop strings (matched on the output text)")
                rid = f"gen-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, ids, with_tokenizer_eos(p, self.tokenizer))
                if p.stop:
                    streams[rid] = TextStream(self.tokenizer, p.stop, p.min_tokens)
                outputs[rid] = RequestOutput(
                    rid,
                    prompt if isinstance(prompt, str) else None,
                    ids,
                    logprobs=[] if p.logprobs is not None else None,
                )
                order.append(rid)
        except Exception:
            for rid in order:
                self.engine.abort(rid)
            raise
        t0, n_tokens = time.perf_counter(), 0
        while self.engine.has_unfinished():
            for ev in self.engine.step():
                out = outputs[ev.request_id]
                out.token_ids.append(ev.token_id)
                if out.logprobs is not None and ev.logprob is not None:
                    out.logprobs.append(ev.logprob)
                if ev.prompt_logprobs is not None:
                    out.prompt_logprobs = self._prompt_logprobs(ev.prompt_logprobs)
                n_tokens += 1
                stream = streams.get(ev.request_id)
                if stream is not None and ev.token_id >= 0:
                    stream.push(ev.token_id)
                    if ev.finished:
                        stream.finish()
                    if stream.stopped and out.finish_reason is None:
                        out.finish_reason = FinishReason.STOP.value  # a stop string matched
                        if not ev.finished:
                            self.engine.abort(ev.request_id)  # so the request ends here
                if ev.finished and out.finish_reason is None:
                    out.finish_reason = (ev.finish_reason or FinishReason.STOP).value
        elapsed = time.perf_counter() - t0
        self.last_stats = {
            "output_tokens": n_tokens,
            "seconds": elapsed,
            "tokens_per_second": n_tokens / elapsed if elapsed > 0 else 0.0,
        }
        for rid, out in outputs.items():  # ids the tokenizer lacks add no text; none: "" (vLLM)
            stream = streams.get(rid)
            out.text = (
                stream.text
                if stream is not None
                else self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            )
        return [outputs[rid] for rid in order]

    def _prompt_logprobs(self, entries: Sequence[PromptLogprob]) -> list[dict[int, Logprob] | None]:
        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id])

        out: list[dict[int, Logprob] | None] = [None]
        for e in entries:
            d = {e.token_id: Logprob(e.logprob, e.rank, text(e.token_id))}
            for rank, (t, v) in enumerate(e.top_logprobs, 1):
                d[t] = Logprob(v, rank, text(t))  # the prompt token keeps its place (vLLM)
            out.append(d)
        return out

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if (
        isinstance(prompts, Sequence)
        and prompts
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)
    ):
        return [list(prompts)]  # one prompt of token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise UserInputError(
            "prompts must be a non-empty string, list of token ids, or list of those"
        )
    out: list[Prompt] = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p
        ):
            out.append(list(p))
        else:
            raise UserInputError(
                f"a prompt must be text or a list of token ids, got {type(p).__name__}"
            )
    return out
