"""`afdserve make-model`: write a random HF-format model (see afdserve/model/make_model.py)."""

from __future__ import annotations

import argparse
from typing import Any

from afdserve.model.config import DTYPES, SUPPORTED_ARCHITECTURES

_ALIASES = ("llama", "qwen2", "qwen3", "mixtral", "qwen3-moe")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "make-model",
        help="write a randomly initialised model in HF format",
        description=(
            "Write a randomly initialised model (config.json, safetensors weights, byte-level "
            "tokenizer) in the HF hub format, loadable by afdserve and by HF transformers."
        ),
    )
    p.add_argument(
        "--arch",
        required=True,
        help=f"one of {', '.join(_ALIASES)} or an HF class name ({', '.join(SUPPORTED_ARCHITECTURES)})",
    )
    p.add_argument(
        "--preset", choices=("tiny", "small"), default="tiny", help="model size (default tiny)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)"
    )
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default 1)")
    p.add_argument(
        "--router-skew",
        type=float,
        default=0.0,
        metavar="S",
        help="MoE only: make a few experts hot (S ~ 1: in most tokens' top-k), for EPLB tests",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from afdserve.model.config import ModelConfig
    from afdserve.model.make_model import make_model, resolve_arch

    out = make_model(
        resolve_arch(args.arch),
        args.preset,
        args.seed,
        args.out,
        dtype=args.dtype,
        shards=args.shards,
        router_skew=args.router_skew,
    )
    config = ModelConfig.from_dir(out)
    files = sorted(p.name for p in out.iterdir())
    print(
        f"wrote {config.architecture} ({args.preset}, seed {args.seed}, {args.dtype}) to {out}: "
        f"{', '.join(files)}"
    )
    return 0
