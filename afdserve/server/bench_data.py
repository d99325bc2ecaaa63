"""Benchmark requests: token-id prompts of given lengths, from a random spec or a request trace.

Prompts are token ids, not text, so a prompt has exactly the length asked for whatever the
tokenizer; ids are drawn uniformly from [0, vocab_size) with a seeded generator. Each request
asks for exactly its output length (`max_tokens` with `ignore_eos`), as `vllm bench serve` does.

Trace datasets (`azure-conv`, `azure-code`, `mooncake`, or any trace file `load_trace` reads)
give each request's prompt and output length; requests are sampled from the trace with the seed.
Lengths are clipped to what the server can hold: the prompt to `max_input_len` (default: the
context minus one), the output to the context the prompt leaves (and to `max_output_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afdserve.errors import UserInputError

TRACE_DATASETS = ("azure-conv", "azure-code", "mooncake")


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def random_requests(
    num: int, input_len: int, output_len: int, vocab_size: int, seed: int
) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1:
        raise UserInputError(
            f"--random-input-len and --random-output-len must be >= 1, got {input_len} and {output_len}"
        )
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(num, input_len))
    return [BenchRequest(row.tolist(), output_len) for row in ids]


def trace_requests(
    dataset: str,
    num: int,
    vocab_size: int,
    max_model_len: int,
    seed: int,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> list[BenchRequest]:
    """`num` requests sampled (seeded, without replacement while the trace lasts) from a trace."""
    from afdserve.planner.workload import load_trace

    if max_model_len < 2:
        raise UserInputError(
            f"the server's max_model_len {max_model_len} leaves no room to generate"
        )
    trace = load_trace(dataset)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(trace))
    if num > len(trace):
        idx = np.concatenate([idx, rng.integers(0, len(trace), size=num - len(trace))])
    cap_in = max_model_len - 1 if max_input_len is None else min(max_input_len, max_model_len - 1)
    if cap_in < 1:
        raise UserInputError(f"--max-input-len must be >= 1, got {max_input_len}")
    out = []
    for i in idx[:num]:
        n_in = int(min(max(int(trace.prompt_len[i]), 1), cap_in))
        n_out = int(min(max(int(trace.output_len[i]), 1), max_model_len - n_in))
        if max_output_len is not None:
            n_out = min(n_out, max_output_len)
        out.append(BenchRequest(rng.integers(0, vocab_size, size=n_in).tolist(), n_out))
    return out
