"""Prefix reuse of a workload: how many prompt tokens a prefix cache would not recompute.

A request whose prompt starts with blocks an earlier request already computed can take their KV
from the cache (vLLM's automatic prefix caching, SGLang's RadixAttention): its prefill computes
only the rest, so TTFT and the prefill capacity depend on the hit rate, while decode still reads
the whole context (the ratio's attention term does not change). Two sources:

- a trace's block hash ids (the Mooncake traces: one id per 512-token block, chained, so equal
  ids at the same position mean an equal prefix): with an unbounded cache, a request's cached
  prefix is its leading blocks whose ids an earlier request (in arrival order) already had;
- a given hit rate h: every request has floor(h * P) cached tokens.

Either way at least one prompt token is computed (the one that samples the first token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from afdserve.errors import UserInputError

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake traces (6758 prompt tokens carry 14 ids: ceil(6758/512))."""


def cached_from_hash_ids(
    path: str | os.PathLike[str], block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> np.ndarray:
    """Per request, in the order `load_trace` gives (stable sort by timestamp), the prompt
    tokens an unbounded prefix cache holds when it arrives; a file without `hash_ids` is an
    error (there is no prefix structure to read)."""
    p = Path(path)
    stamps, prompts, ids = [], [], []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{p}: cannot read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            h = rec["hash_ids"]
            stamps.append(float(rec.get("timestamp", 0)))
            prompts.append(int(rec["input_length"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserInputError(
                f"{p}, line {n}: need input_length and hash_ids for prefix hits"
            ) from None
        if not isinstance(h, list):
            raise UserInputError(f"{p}, line {n}: hash_ids must be a list")
        ids.append(h)
    if not ids:
        raise UserInputError(f"{p}: no requests")
    order = np.argsort(np.asarray(stamps), kind="stable")
    seen: set[int] = set()
    cached = np.zeros(len(ids), dtype=np.int64)
    for j, i in enumerate(order.tolist()):
        lead = 0
        for h in ids[i]:
            if h not in seen:
                break
            lead += 1
        seen.update(ids[i])
        cached[j] = max(0, min(lead * block_tokens, prompts[i] - 1))
    return cached


def cached_from_rate(prompt_len: np.ndarray, hit_rate: float) -> np.ndarray:
    """floor(h * P) cached tokens per request, at most P - 1."""
    if not (0.0 <= hit_rate < 1.0):
        raise UserInputError(f"prefix hit rate must be in [0, 1), got {hit_rate!r}")
    p = np.asarray(prompt_len, dtype=np.int64)
    return np.clip(np.floor(hit_rate * p).astype(np.int64), 0, np.maximum(p - 1, 0))


def hit_rate(cached: np.ndarray, prompt_len: np.ndarray) -> float:
    """Share of prompt tokens served from the cache."""
    total = float(np.sum(prompt_len))
    return float(np.sum(cached)) / total if total > 0 else 0.0
