"""`afdserve bench`: an OpenAI-API load generator that reports like `vllm bench serve`.

Sends streaming `/v1/completions` requests with token-id prompts (see bench_data), at a Poisson
request rate (or all at once with `inf`), at most `max_concurrency` in flight, and measures on
the client: time to first token (first chunk with choices), inter-token latency (between
chunks; a chunk carries the tokens the server had ready, usually one), time per output token
excluding the first ((latency - ttft) / (output tokens - 1)), and end-to-end latency. Output
token counts come from the usage the server returns in its last chunk. Works against any
OpenAI-compatible server that accepts token-id prompts and `ignore_eos` (afdserve, vLLM).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.server.bench_data import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    error: str = ""


@dataclass
class BenchConfig:
    base_url: str
    model: str
    request_rate: float = math.inf
    max_concurrency: int | None = None
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 600.0
    percentiles: tuple[float, ...] = (99.0,)
    disable_tqdm: bool = False


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer KEY` for a server started with --api-key: the key from
    $AFDSERVE_API_KEY, else $OPENAI_API_KEY (as vLLM's bench reads it); none if unset."""
    import os

    key = os.environ.get("AFDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def fetch_server_info(base_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The first model card of the server's /v1/models (id, max_model_len, maybe vocab_size)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=auth_headers()) as client:
            resp = await client.get(url)
            resp.raise_for_status()
            data = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise UserInputError(f"cannot read {url}: {exc}") from None
    models = data.get("data") if isinstance(data, dict) else None
    if not models:
        raise UserInputError(f"{url} lists no models")
    return models[0]


async def send_request(client: Any, cfg: BenchConfig, req: BenchRequest) -> RequestResult:
    payload = {
        "model": cfg.model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": cfg.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = RequestResult(prompt_len=req.prompt_len)
    chunks = 0
    usage_tokens = None
    st = time.perf_counter()
    res.start_time = st
    last = st
    try:
        async with client.stream(
            "POST", cfg.base_url.rstrip("/") + "/v1/completions", json=payload
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                now = time.perf_counter()
                if obj.get("choices"):
                    if chunks == 0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
            if not done:
                res.error = "stream ended without [DONE]"
                return res
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = last - st
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.success = chunks > 0
    if not res.success:
        res.error = "no tokens received"
    return res


async def run_benchmark(
    cfg: BenchConfig, requests: list[BenchRequest]
) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results (in request order) and the wall duration."""
    import httpx
    from tqdm import tqdm

    rng = np.random.default_rng(cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    limits = httpx.Limits(
        max_connections=cfg.max_concurrency or len(requests) or 1, max_keepalive_connections=0
    )
    pbar = tqdm(total=len(requests), disable=cfg.disable_tqdm)

    async with httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s), limits=limits, headers=auth_headers()
    ) as client:

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                r = await send_request(client, cfg, req)
            else:
                async with sem:
                    r = await send_request(client, cfg, req)
            pbar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.ensure_future(one(req)))
            if math.isfinite(cfg.request_rate):
                await asyncio.sleep(float(rng.exponential(1.0 / cfg.request_rate)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    pbar.close()
    return results, duration


def compute_metrics(
    results: list[RequestResult], duration: float, percentiles: tuple[float, ...] = (99.0,)
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    m: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        arr = np.asarray(values if values else [0.0]) * 1000.0
        m[f"mean_{name}_ms"] = float(arr.mean())
        m[f"median_{name}_ms"] = float(np.median(arr))
        m[f"std_{name}_ms"] = float(arr.std())
        for p in percentiles:
            m[f"p{_pword(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return m


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def format_result(
    m: dict[str, Any],
    max_concurrency: int | None,
    request_rate: float,
    percentiles: tuple[float, ...] = (99.0,),
) -> str:
    """The result block, line for line in the format of `vllm bench serve`."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(("{:<40} {:<10" + fmt + "}").format(label, value))

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if math.isfinite(request_rate):
        row("Request rate configured (RPS):", request_rate, ".2f")
    row("Benchmark duration (s):", m["duration"], ".2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", m["total_token_throughput"], ".2f")
    for key, name, header in (
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {name} (ms):", m[f"mean_{key}_ms"], ".2f")
        row(f"Median {name} (ms):", m[f"median_{key}_ms"], ".2f")
        for p in percentiles:
            row(f"P{_pword(p)} {name} (ms):", m[f"p{_pword(p)}_{key}_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


def result_record(
    cfg: BenchConfig, dataset: str, m: dict[str, Any], results: list[RequestResult]
) -> dict[str, Any]:
    """What --save-result writes: the settings, the metrics, and every request's numbers."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "base_url": cfg.base_url,
        "model_id": cfg.model,
        "dataset": dataset,
        "num_prompts": len(results),
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "max_concurrency": cfg.max_concurrency,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        **m,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "errors": [r.error for r in results],
        "config": {
            k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
            for k, v in asdict(cfg).items()
        },
    }
