"""Is a token's linear-layer output independent of how many tokens share its batch, bit for bit?

AFD gives exactly the aggregated tokens only if it is: an attention worker's batch, a microbatch
and the FFN's gathered batch all hold different numbers of rows than the aggregated engine's
batch. This prints, for a device, dtype and layer shape, the row counts M whose shared rows
differ from the same rows computed at M = 4, for plain F.linear, afdserve's fast mode (one call
on the prepared weight: oneDNN's packed layout on a CPU) and its exact mode (fixed row tiles,
model/kernels.py), and what exactness costs in time (ms per call at a few M).

    python benchmarks/check_batch_invariance.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from afdserve.model.kernels import Kernels

FAST, EXACT = Kernels(), Kernels(batch_invariant=True)

SHAPES = [(64, 256), (1024, 4096), (4096, 4096), (4096, 14336), (14336, 4096)]
ROWS = [1, 2, 3, 4, 5, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]


def _differing(fn, x: torch.Tensor, w: torch.Tensor) -> list[str]:
    """Row counts M whose first min(M, 4) rows differ from the same rows computed at M = 4."""
    ref = fn(x[:4], w)  # [4, out]
    out = []
    for m in ROWS:
        y = fn(x[:m], w)  # [m, out]
        k = min(m, 4)
        if not torch.equal(y[:k], ref[:k]):
            out.append(f"{m} ({(y[:k].float() - ref[:k].float()).abs().max().item():.1e})")
    return out


def _ms(fn, x: torch.Tensor, w: torch.Tensor, sync) -> float:
    for _ in range(3):
        fn(x, w)
    sync()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x, w)
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--time-rows", nargs="+", type=int, default=[128, 512, 2048])
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device {args.device} ({name}), torch {torch.__version__}")
    if dev.type == "cuda":
        print(f"TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    print(
        "rows M whose shared rows differ from M = 4 (value: largest difference); 'none' = invariant"
    )
    g = torch.Generator().manual_seed(0)
    for dt_name in args.dtypes:
        dt = getattr(torch, dt_name)
        for d_in, d_out in SHAPES:
            w = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dt).to(dev)  # [out, in]
            x = torch.randn(max(ROWS), d_in, generator=g).to(dt).to(dev)  # [Mmax, in]
            prepared = FAST.prepare(w)
            fast = lambda x, _w, p=prepared: FAST.linear(x, p)  # noqa: E731
            exact = lambda x, _w, p=prepared: EXACT.linear(x, p)  # noqa: E731
            for label, fn in (
                ("F.linear", F.linear),
                ("afdserve fast", fast),
                ("afdserve exact", exact),
            ):
                differ = _differing(fn, x, w)
                print(
                    f"{dt_name:9s} [{d_in:5d} -> {d_out:5d}] {label:16s} "
                    + (", ".join(differ) if differ else "none")
                )
            times = [
                f"M={m}: {_ms(F.linear, x[:m], w, sync):.3f} / {_ms(fast, x[:m], w, sync):.3f}"
                f" / {_ms(exact, x[:m], w, sync):.3f}"
                for m in args.time_rows
            ]
            print(f"{'':9s} {'':17s} ms F.linear / fast / exact: " + "; ".join(times))


if __name__ == "__main__":
    main()
