"""`afdserve serve` (the OpenAI-compatible server) and `afdserve bench` (its load generator)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path

from afdserve.errors import UserInputError
from afdserve.llm_cli import (
    DEFAULT_MODEL,
    add_engine_args,
    add_front_args,
    engine_options,
    front_options,
)

DEFAULT_PORT = 8000
log = logging.getLogger("afdserve.server")
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # = server.state's; not imported, to keep the CLI light
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0  # = server.state's, likewise
API_KEY_ENV = "AFDSERVE_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (default: AFD 2A1F, built-in model)",
    )
    s.add_argument(
        "model_arg",
        nargs="?",
        metavar="MODEL",
        default=None,
        help=f"HF-format model dir or builtin:NAME (default {DEFAULT_MODEL}); same as --model",
    )
    add_engine_args(s)
    s.add_argument(
        "--transport",
        default="local",
        help="activation transport: local (every worker a thread of this process), or shm, "
        "torch, tcp, nixl (one process per worker) (default %(default)s)",
    )
    add_front_args(s)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV memory per attention worker")
    s.add_argument(
        "--sync-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="longest wait for a peer worker before the engine fails (seconds)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        metavar="Q",
        help="waiting requests beyond which new ones get HTTP 429 (default %(default)s)",
    )
    s.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: MODEL)"
    )
    s.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every /v1 route (repeatable: any of them; "
        f"default: ${API_KEY_ENV} if set); /health, /ping, /metrics, /version stay open",
    )
    s.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|TEMPLATE",
        help="a Jinja chat template (a file, or the template itself) used instead of the model's",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template (refused with a 400 otherwise)",
    )
    s.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (the tokenizer's config and chat template; lm-eval's "
        "remote tokenizer needs it)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest request body; larger ones get HTTP 413 (default %(default)s, 16 MiB)",
    )
    s.add_argument(
        "--shutdown-timeout",
        "--drain-timeout",
        dest="shutdown_timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="S",
        help="on SIGTERM or Ctrl-C, answer new requests 503 and let those in flight finish for "
        "up to S seconds, then cut the rest with a 503 error (streams: an error event and "
        "[DONE]); 0 cuts at once, a second signal too (default %(default)s)",
    )
    s.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    s.add_argument(
        "--legacy-metric-names",
        action="store_true",
        help="/metrics also under the afdserve: names it used before vLLM's (afdserve:"
        "time_per_output_token_seconds is per request there)",
    )
    s.set_defaults(func=run_serve)

    b = sub.add_parser(
        "bench", help="load-test a running server; prints vllm bench serve's result block"
    )
    b.add_argument("--base-url", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    b.add_argument(
        "--model", default=None, help="model name to request (default: the server's first)"
    )
    b.add_argument(
        "--dataset",
        default="random",
        help="random, azure-conv, azure-code, mooncake, or a trace file (.csv/.jsonl)",
    )
    b.add_argument("--num-prompts", type=int, default=100)
    b.add_argument("--request-rate", default="inf", help="requests per second (Poisson), or inf")
    b.add_argument("--max-concurrency", type=int, default=None)
    b.add_argument("--random-input-len", type=int, default=128)
    b.add_argument("--random-output-len", type=int, default=64)
    b.add_argument(
        "--max-input-len",
        type=int,
        default=None,
        help="clip trace prompts to this (default: the server's max_model_len - 1)",
    )
    b.add_argument("--max-output-len", type=int, default=None, help="clip trace outputs to this")
    b.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="draw prompt token ids from [0, V) (default: the server's vocab_size)",
    )
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    b.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (seconds)")
    b.add_argument("--save-result", type=Path, default=None, metavar="F.json")
    b.add_argument("--disable-tqdm", action="store_true")
    b.set_defaults(func=run_bench)


def serve_config(args: argparse.Namespace):
    """The EngineConfig `serve` runs (validated; bad flags raise UserInputError)."""
    from afdserve.config import EngineConfig

    if args.model_arg is not None:
        if args.model not in (DEFAULT_MODEL, args.model_arg):
            raise UserInputError(
                f"MODEL {args.model_arg!r} and --model {args.model!r} disagree; give one"
            )
        args.model = args.model_arg
    if args.transport != "local" and args.mode != "afd":
        raise UserInputError(
            f"--transport {args.transport} starts AFD worker processes; aggregated mode runs "
            "in this process: use --transport local"
        )
    return EngineConfig(
        **engine_options(args),
        **front_options(args),
        transport=args.transport,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=args.kv_cache_gib,
        sync_timeout_s=args.sync_timeout,
        seed=args.seed,
        # --threads is the torch threads of whoever computes: here, or each worker process
        worker_threads=max(1, args.threads or 1),
    )


def serving_options(args: argparse.Namespace):
    """The FrontOptions `serve` runs with (validated; bad flags raise UserInputError)."""
    import os

    from afdserve.server.state import FrontOptions

    keys = args.api_key if args.api_key else [os.environ.get(API_KEY_ENV, "")]
    keys = [k for k in keys if k]
    if args.api_key and len(keys) != len(args.api_key):
        raise UserInputError("--api-key must not be empty")
    if args.max_request_bytes < 1024:
        raise UserInputError(f"--max-request-bytes must be >= 1024, got {args.max_request_bytes}")
    if not (args.shutdown_timeout >= 0 and math.isfinite(args.shutdown_timeout)):
        raise UserInputError(
            f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}"
        )
    return FrontOptions(
        api_keys=tuple(keys),
        chat_template=load_chat_template(args.chat_template),
        trust_request_chat_template=args.trust_request_chat_template,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it is a Jinja template (it
    must compile either way)."""
    if value is None:
        return None
    from afdserve.model.tokenizer import check_chat_template

    if "{{" in value or "{%" in value:  # a template (a path never looks like one)
        text = value
    elif _is_file(Path(value).expanduser()):
        try:
            text = Path(value).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"--chat-template {value}: cannot read it ({exc})") from None
    else:
        raise UserInputError(
            f"--chat-template {value!r}: no such file, and not a Jinja template either"
        )
    try:
        check_chat_template(text)
    except UserInputError as exc:
        raise UserInputError(f"--chat-template: {exc}") from None
    return text


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def run_serve(args: argparse.Namespace) -> int:
    cfg = serve_config(args)
    if not 0 < args.port < 65536:
        raise UserInputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 1:
        raise UserInputError(f"--max-queue must be >= 1, got {args.max_queue}")
    options = serving_options(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from afdserve.model.config import ModelConfig
    from afdserve.model.tokenizer import load_tokenizer
    from afdserve.server.api import build_app, describe
    from afdserve.server.drain import DrainingServer

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    # while worker processes start, SIGTERM unwinds like Ctrl-C, so that the workers started
    # so far are shut down by the engine's clean-up rather than left to PR_SET_PDEATHSIG;
    # once serving, uvicorn handles it (graceful shutdown, then the default action)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_exit) if main_thread else None
    try:
        engine, model_path = _start_engine(cfg)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    try:
        tokenizer = load_tokenizer(model_path, engine.vocab_size, cfg.skip_tokenizer_init)
        defaults = ModelConfig.from_dir(model_path).sampling_defaults
        if defaults:
            log.info(
                "generation_config.json sampling defaults (temperature, top_p, top_k apply to requests that leave them out): %s",
                defaults,
            )
        name = args.served_model_name or cfg.model
        app = build_app(
            engine,
            tokenizer,
            cfg,
            served_model_name=name,
            model_root=str(model_path),
            max_queue=args.max_queue,
            sampling_defaults=defaults,
            legacy_metric_names=args.legacy_metric_names,
            options=options,
        )
        print(
            f"afdserve serve: {name}, {describe(cfg)}, on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=UVICORN_GRACE_S,
            access_log=False,
        )
        async_engine = app.state.serving.async_engine
        server = DrainingServer(
            config, async_engine, options.shutdown_timeout_s, exit_on_failure=True
        )
        # SIGINT/SIGTERM: drain (--shutdown-timeout), then uvicorn's shutdown; the lifespan
        # stops the engine thread and closes the engine, which for worker processes means
        # shutdown, then SIGTERM, then SIGKILL
        server.run()
        if not server.started:
            return 1
        if async_engine.error is not None:
            return ENGINE_FAILED
    finally:
        engine.close()  # idempotent; covers a server that never started
    return 0


ENGINE_FAILED = 3
"""`afdserve serve`'s exit code once its engine failed for good (an FFN worker dead past
--max-restarts, no attention worker left): for a supervisor (systemd, Kubernetes) to restart
the whole group."""


UVICORN_GRACE_S = 5
"""uvicorn's own graceful shutdown, after the drain: time for the last answers (the cut
requests' errors) to reach their clients before their connections are closed."""


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _start_engine(cfg):
    """The engine `serve` runs over, and its model directory: in-process for `--transport
    local`, else one process per worker (`MultiProcessEngine`, the same EngineClient interface)."""
    from afdserve.launch.start import start_engine

    if cfg.transport != "local":
        what = "waiting for" if cfg.front else "starting"
        print(
            f"afdserve serve: {what} {cfg.attention_workers} attention and {cfg.ffn_workers} FFN "
            f"worker processes over {cfg.transport}"
            + (f" at front {cfg.front}" if cfg.front else ""),
            file=sys.stderr,
            flush=True,
        )
    return start_engine(cfg)


def _rate(text: str) -> float:
    if text.strip().lower() == "inf":
        return math.inf
    try:
        rate = float(text)
    except ValueError:
        raise UserInputError(f"--request-rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise UserInputError(f"--request-rate must be > 0, got {text!r}")
    return rate


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UserInputError(
            f"--percentiles: expected numbers like 50,90,99, got {text!r}"
        ) from None
    if not ps or not all(0 < p <= 100 for p in ps):
        raise UserInputError(f"--percentiles must be in (0, 100], got {text!r}")
    return ps


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from afdserve.server.bench import (
        BenchConfig,
        compute_metrics,
        fetch_server_info,
        format_result,
        result_record,
        run_benchmark,
    )
    from afdserve.server.bench_data import random_requests, trace_requests

    rate = _rate(args.request_rate)
    percentiles = _percentiles(args.percentiles)
    if args.num_prompts < 1:
        raise UserInputError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UserInputError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    info = asyncio.run(fetch_server_info(args.base_url))
    model = args.model or info["id"]
    vocab = args.vocab_size or info.get("vocab_size")
    if not vocab:
        raise UserInputError("the server does not report vocab_size; give --vocab-size")
    max_len = int(info.get("max_model_len") or 0)
    if args.dataset == "random":
        if max_len and args.random_input_len + args.random_output_len > max_len:
            raise UserInputError(
                f"--random-input-len + --random-output-len = {args.random_input_len + args.random_output_len} "
                f"exceeds the server's max_model_len {max_len}"
            )
        reqs = random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len, vocab, args.seed
        )
    else:
        if not max_len:
            raise UserInputError("the server does not report max_model_len; trace datasets need it")
        reqs = trace_requests(
            args.dataset,
            args.num_prompts,
            vocab,
            max_len,
            args.seed,
            args.max_input_len,
            args.max_output_len,
        )
    cfg = BenchConfig(
        base_url=args.base_url,
        model=model,
        request_rate=rate,
        max_concurrency=args.max_concurrency,
        temperature=args.temperature,
        seed=args.seed,
        timeout_s=args.timeout,
        percentiles=percentiles,
        disable_tqdm=args.disable_tqdm,
    )
    print(f"Traffic request rate: {args.request_rate}")
    print(f"Maximum request concurrency: {args.max_concurrency}")
    results, duration = asyncio.run(run_benchmark(cfg, reqs))
    metrics = compute_metrics(results, duration, percentiles)
    print(format_result(metrics, args.max_concurrency, rate, percentiles))
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    if args.save_result is not None:
        record = result_record(cfg, args.dataset, metrics, results)
        try:
            args.save_result.write_text(json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            raise UserInputError(
                f"cannot write --save-result {args.save_result}: {exc.strerror}"
            ) from None
        print(f"saved {args.save_result}")
    return 0 if not errors else 1
