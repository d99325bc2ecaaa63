"""Is a token's linear-layer output independent of how many tokens share its batch, bit for bit?

AFD gives exactly the aggregated tokens only if it is: an attention worker's batch, a microbatch
and the FFN's gathered batch all hold different numbers of rows than the aggregated engine's
batch. afdserve's `linear` pads the row count to a multiple of 4 because CPU GEMM kernels treat
the last 1-3 rows differently. This prints, for a device, dtype and layer shape, the row counts M
whose shared rows differ from the same rows computed at M = 4 (an empty list: invariant).

    python benchmarks/check_batch_invariance.py --device cuda
"""

from __future__ import annotations

import argparse

import torch

from afdserve.model.layers import linear

SHAPES = [(64, 256), (1024, 4096), (4096, 4096), (4096, 14336), (14336, 4096)]
ROWS = [1, 2, 3, 4, 5, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}")
    if dev.type == "cuda":
        print(f"TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    g = torch.Generator().manual_seed(0)
    for dt_name in args.dtypes:
        dt = getattr(torch, dt_name)
        for d_in, d_out in SHAPES:
            w = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dt).to(dev)  # [out, in]
            x = torch.randn(max(ROWS), d_in, generator=g).to(dt).to(dev)  # [Mmax, in]
            ref = linear(x[:4], w)  # [4, out]: rows 0..3 as computed in a batch of 4
            differ = []
            for m in ROWS:
                y = linear(x[:m], w)  # [m, out]
                k = min(m, 4)
                if not torch.equal(y[:k], ref[:k]):
                    worst = (y[:k].float() - ref[:k].float()).abs().max().item()
                    differ.append(f"{m} ({worst:.1e})")
            print(
                f"{dt_name:9s} [{d_in:5d} -> {d_out:5d}]  rows differing from M=4: "
                + (", ".join(differ) if differ else "none")
            )


if __name__ == "__main__":
    main()
