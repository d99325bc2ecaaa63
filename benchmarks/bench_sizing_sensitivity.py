"""How the published-deployment errors move with the roofline FFN's two assumptions (issue 18).

    python benchmarks/bench_sizing_sensitivity.py

`bench_sizing_published.py` quotes the documented defaults; this prints what the same validation
gives when the FFN's compute and weight streaming add up instead of overlapping (`sum` vs `max`)
and when an MoE FFN reaches a smaller fraction of peak FLOP/s than dense GEMMs (`moe_flops`),
every other efficiency at its default. One row per setting: Step-3's two Table 8 errors and the
planner's best A:F (deployed: 1 at 4K, 2 at 8K), and per FastAFD context row the median
|error| and the best k (published: 5, 6, 7, 15 trays). It is a sensitivity map, not a fit: the
defaults are not chosen from it. Pure numpy, a few seconds.
"""

from __future__ import annotations

import dataclasses

from afdserve.planner.roofline import Efficiency
from afdserve.sim.published import validate_published

SETTINGS = [  # (ffn_combine, moe_flops; None = as dense, 0.6)
    ("max", None),
    ("max", 0.3),
    ("max", 0.2),
    ("sum", None),
    ("sum", 0.3),
    ("sum", 0.2),
]


def main() -> None:
    print(
        "| FFN | MoE flops | Step-3 4K / 8K error | planner A:F 4K / 8K | FastAFD median abs error "
        "(best k) 16K / 32K / 64K / 128K |"
    )
    print("|---|---|---|---|---|")
    for combine, moe in SETTINGS:
        eff = dataclasses.replace(Efficiency(), ffn_combine=combine, moe_flops=moe)
        rep = validate_published(eff)
        step3 = " / ".join(f"{c.error:+.1%}" for c in rep.step3)
        ratios = " / ".join(str(r["planner_best_ratio"]) for r in rep.step3_ratio)
        fast = " / ".join(
            f"{r['median_abs_error']:.1%} ({r['best_k_predicted']})" for r in rep.fastafd_rows
        )
        label = f"{combine} (default)" if (combine, moe) == ("max", None) else combine
        moe_txt = f"{eff.flops:g} (as dense)" if moe is None else f"{moe:g}"
        print(f"| {label} | {moe_txt} | {step3} | {ratios} | {fast} |")
    pub = validate_published()
    print(
        "published best k: "
        + " / ".join(str(r["best_k_published"]) for r in pub.fastafd_rows)
        + "; deployed Step-3 A:F: "
        + " / ".join(str(r["deployed_ratio"]) for r in pub.step3_ratio)
    )


if __name__ == "__main__":
    main()
