"""FFN failover against waiting for the restart: 2A:2F worker processes on a random MoE, a
steady set of greedy streams, SIGKILL of one FFN worker mid-stream; per mode, how long the
streams stopped (the longest gap between two token events, and the first token after the
kill), whether every request ended with the undisturbed tokens, and how the survivors served.

    python benchmarks/bench_ffn_failover.py [--preset tiny] [--streams 6] [--max-tokens 120]

Modes: `failover` (the survivor takes the dead worker's experts, loading those it lacks: no
replicas, the static placement) and `restart` (`--no-ffn-failover`: the attention workers wait
for the restarted worker). Exact mode (--batch-invariant), so tokens are compared exactly with
an undisturbed run of the same group. Every process is ours, on 127.0.0.1, stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from afdserve import LLM, SamplingParams


def _run(model: Path, args, failover: bool | None, prompts) -> dict:
    """One group; `failover` None: no fault (the reference)."""
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(
        str(model),
        mode="afd",
        attention_workers=2,
        ffn_workers=2,
        microbatches=1,
        transport=args.transport,
        batch_invariant=True,
        ffn_failover=bool(failover),
    ) as llm:
        engine = llm.engine
        for k, p in enumerate(prompts):
            engine.add_request(f"r{k}", p, params)
        tokens: dict[str, list[int]] = {}
        stamps: list[float] = []
        killed_at = None
        while engine.has_unfinished():
            for ev in engine.step():
                if ev.token_id >= 0:
                    tokens.setdefault(ev.request_id, []).append(ev.token_id)
                    stamps.append(time.monotonic())
            started = len(tokens) == len(prompts) and min(map(len, tokens.values())) >= 4
            if failover is not None and killed_at is None and started:
                os.kill(engine.pids[-1], signal.SIGKILL)
                killed_at = time.monotonic()
        after = [t for t in stamps if killed_at is not None and t > killed_at]
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        st = engine.state(afd=False)
        return dict(
            tokens=tokens,
            first_after=(after[0] - killed_at) if after else float("nan"),
            longest_gap=max(gaps) if gaps else 0.0,
            failovers=st.ffn_failovers,
            restarts=st.worker_restarts,
            loaded=engine.failover.experts_loaded if engine.failover else 0,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=120)
    args = ap.parse_args()
    from afdserve.model.make_model import make_model

    model = make_model("qwen3-moe", args.preset, 0, Path(tempfile.mkdtemp()) / "moe")
    prompts = [[3 + k, 40 + k, 7] * (k + 1) for k in range(args.streams)]
    reference = _run(model, args, None, prompts)["tokens"]
    print(
        f"qwen3-moe {args.preset}, 2A:2F over {args.transport}, {args.streams} streams x "
        f"{args.max_tokens} tokens, SIGKILL of FFN rank 3 once every stream has 4 tokens"
    )
    print(
        f"{'mode':<9} {'exact':>5} {'first token after kill s':>25} {'longest gap s':>14} "
        f"{'failovers':>9} {'restarts':>8} {'experts loaded':>14}"
    )
    for mode in ("failover", "restart"):
        r = _run(model, args, mode == "failover", prompts)
        print(
            f"{mode:<9} {str(r['tokens'] == reference):>5} {r['first_after']:>25.2f} "
            f"{r['longest_gap']:>14.2f} {r['failovers']:>9} {r['restarts']:>8} "
            f"{r['loaded']:>14}"
        )


if __name__ == "__main__":
    main()
