"""Top-k/top-p filtering: the full stable sort (the definition) against `apply_top_k_top_p`,
which lets the 1024 largest logits decide a row whenever they can (and falls back otherwise).

Logits are N(0, s^2) per token for each spread s: at s = 3 the 0.9-nucleus of a 152K vocabulary
holds thousands of tokens (an uncertain position), at s = 6 a handful (a confident one). The rows
the fast path decides are counted. Milliseconds per call, median of 7, torch threads as given.

    python benchmarks/bench_sampler.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--spreads", type=float, nargs="+", default=[3.0, 6.0])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from afdserve.engine import sampler

    print(f"torch {torch.__version__}, {args.threads} threads; ms per call (median of 7)")
    print(f"{'spread':>6} {'vocab':>7} {'rows':>5} {'top_k':>5} {'top_p':>5} {'full sort':>10} "
          f"{'afdserve':>9} {'speed-up':>8} {'fast rows':>9}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    cases = [(s, v, r) for s in args.spreads for v in args.vocabs for r in args.rows]
    for spread, vocab, rows in cases:
        x = torch.randn(rows, vocab, generator=g) * spread  # [R, V]
        for top_k, top_p in ((0, 0.9), (50, 0.9), (0, 0.99)):
            ks, ps = [top_k] * rows, [top_p] * rows
            slow = _ms(lambda: sampler._top_k_top_p_sorted(x, ks, ps))  # noqa: B023
            fast = _ms(lambda: sampler.apply_top_k_top_p(x, ks, ps))  # noqa: B023
            _, _, decided = sampler._top_p_candidates(x, ks, ps)
            print(f"{spread:>6} {vocab:>7} {rows:>5} {top_k:>5} {top_p:>5} {slow:>10.2f} "
                  f"{fast:>9.2f} {slow / fast:>7.1f}x {sum(decided):>4}/{rows:<4}")  # fmt: skip


if __name__ == "__main__":
    main()
