"""How the published-deployment errors move with the roofline FFN's two assumptions (issue 18).

    python benchmarks/bench_sizing_sensitivity.py

`bench_sizing_published.py` quotes the documented defaults (an MoE FFN's per-token compute at
`moe_flops` = 0.43 of peak added to its weight streaming, `sum`; derived from aiconfigurator's
MoE kernel tables by `derive_moe_efficiency.py`); this prints what the same validation gives
with the FFN's compute overlapped with its weight streaming instead (`max`, the form before) and
with other MoE efficiencies (0.2: the median over every kernel in those tables; 0.3 and 0.5:
their fastest cells' range; 0.6 = `flops`, the dense GEMMs'), every other efficiency at its
default. One row per setting: Step-3's two Table 8 errors and the planner's best A:F (deployed:
1 at 4K, 2 at 8K), and per FastAFD context row the median |error| and the best k (published: 5,
6, 7, 15 trays). It is a sensitivity map, not a fit: the defaults are not chosen from it. Pure
numpy, a few seconds.
"""

from __future__ import annotations

import dataclasses

from afdserve.planner.roofline import Efficiency
from afdserve.sim.published import validate_published

DEFAULT = (None, Efficiency().moe_flops)
SETTINGS = [  # (ffn_combine, moe_flops; combine None = sum for MoE, moe_flops None = as dense)
    DEFAULT,
    (None, 0.2),
    (None, 0.3),
    (None, 0.5),
    (None, None),
    ("max", DEFAULT[1]),
    ("max", None),
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
        label = eff.ffn_combine_for(True) + (" (default)" if (combine, moe) == DEFAULT else "")
        moe_txt = f"{eff.ffn_flops_for(True):g}" + (" (as dense)" if moe is None else "")
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
