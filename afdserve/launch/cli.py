"""`afdserve worker` (one worker process) and `afdserve launch` (all workers on this host)."""

from __future__ import annotations

import argparse
import os
from typing import Any

# flag -> (type, default, help); each also reads AFDSERVE_<FLAG> (e.g. AFDSERVE_FRONT). Only where
# the front is and what is local to this host: the model, the group's shape, the cache and the
# kernels come from the front (its one EngineConfig, in `Configure`).
WORKER_FLAGS: dict[str, tuple[Any, Any, str]] = {
    "front": (str, "", "HOST:PORT of a front started with --front (needs --rank)"),
    "rank": (int, None, "this worker's rank: attention workers 0..r-1, the FFN worker r"),
    "control": (str, "", "or: the front's control address for this worker (tcp://...)"),
    "events": (str, "", "and the front's events address (tcp://...)"),
    "host": (
        str,
        "",
        "address peers reach this worker's data sockets at (tcp, torch): set it to this host's "
        "address when the workers run on several hosts (default: tcp 127.0.0.1, torch gloo's)",
    ),
    "cpus": (str, "", "comma-separated cores to pin this process to"),
    "connect-timeout-s": (
        float,
        60.0,
        "deadline for the front's configuration and the data transport's connection",
    ),
    "front-timeout-s": (
        float,
        30.0,
        "exit once the front, after its first message, has sent nothing (not even its 1 s "
        "ping) for this long; 0: never",
    ),
}


def _env_default(flag: str, type_: Any, default: Any) -> Any:
    raw = os.environ.get("AFDSERVE_" + flag.upper().replace("-", "_"))
    if raw is None:
        return default
    try:
        return type_(raw)
    except ValueError:
        from afdserve.errors import UserInputError

        raise UserInputError(
            f"AFDSERVE_{flag.upper().replace('-', '_')}={raw!r} is not a valid {type_.__name__}"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "worker",
        help="run one AFD worker process (attention or FFN, as its front configures it)",
    )
    for flag, (type_, _default, help_) in WORKER_FLAGS.items():
        w.add_argument(
            f"--{flag}",
            type=type_,
            default=None,
            help=f"{help_} [env AFDSERVE_{flag.upper().replace('-', '_')}]",
        )
    w.set_defaults(func=run_worker_cmd)

    from afdserve.llm_cli import add_engine_args, add_front_args

    la = sub.add_parser(
        "launch",
        help="start r attention workers and m FFN workers on this host (or, with --front, wait "
        "for workers started by hand)",
    )
    add_engine_args(la)
    add_front_args(la)
    la.add_argument("--transport", default="shm", choices=("shm", "torch", "tcp", "nixl"))
    la.add_argument("--worker-threads", type=int, default=1)
    la.add_argument("--pin", action="store_true", help="pin worker k to core k mod cores")
    la.add_argument("--sync-timeout-ms", type=float, default=30000.0)
    la.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="generate for this prompt, then exit (repeatable)",
    )
    la.add_argument("--max-tokens", type=int, default=16)
    la.set_defaults(func=run_launch_cmd)


def run_worker_cmd(args: argparse.Namespace) -> int:
    from afdserve.launch.worker import config_from_args, run_worker

    values = {}
    for flag, (type_, default, _) in WORKER_FLAGS.items():
        dest = flag.replace("-", "_")
        v = getattr(args, dest)
        values[dest] = v if v is not None else _env_default(flag, type_, default)
    return run_worker(config_from_args(argparse.Namespace(**values)))


def run_launch_cmd(args: argparse.Namespace) -> int:
    import faulthandler
    import signal
    import threading

    from afdserve.errors import UserInputError
    from afdserve.launch.multiproc import WorkerError
    from afdserve.llm_cli import engine_options, front_options

    opts = (
        engine_options(args)
        | front_options(args)
        | dict(
            transport=args.transport,
            worker_threads=args.worker_threads,
            pin_workers=args.pin,
            sync_timeout_s=args.sync_timeout_ms / 1000,
        )
    )
    if opts["mode"] != "afd":
        raise UserInputError("launch runs AFD workers: --mode must be afd")
    from afdserve.llm import LLM
    from afdserve.types import SamplingParams

    with LLM(**opts) as llm:
        where = f"connected at front {args.front}" if args.front else f"pids {llm.engine.pids}"
        ready = (
            f"afdserve launch: {args.attention_workers} attention workers + 1 FFN worker over "
            f"{args.transport} ready ({where})"
        )
        if args.prompt:
            print(ready, flush=True)
            outs = llm.generate(
                args.prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens)
            )
            for o in outs:
                print(f"{o.prompt!r} -> {o.text!r}")
            return 0
        # From the ready line on, Ctrl-C (SIGINT) and SIGTERM are a clean shutdown (exit 0),
        # taken between steps: a KeyboardInterrupt raised inside a step could leave the
        # front's bookkeeping half updated. The terminal's Ctrl-C reaches the workers too, so
        # a worker found gone once a stop was asked for is that stop, not a failure.
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *a: stop.set())
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints where a hung front is
        print(ready, flush=True)
        while not stop.wait(1.0):
            try:
                llm.engine.step(0)  # surfaces a dead worker as an error
            except WorkerError:
                if not stop.is_set():
                    raise
        print("afdserve launch: shutting down", flush=True)
    return 0
