"""Sizing against published AFD deployments: predicted vs published, with the error.

    python benchmarks/bench_sizing_published.py [--json]

Runs `afdserve sim-validate published` with the documented default efficiencies (never tuned
per case): Step-3's Table 8 rows (arXiv 2507.19427) and FastAFD's measured A:F sweep
(linsj20/FastAFD), both stored with their sources in afdserve/sim/data/. aiconfigurator's AFD
estimate is an optional extra, reported as skipped when the package is absent. Pure numpy, well
under a second; BENCHMARKS.md and docs/simulator.md quote its table.
"""

from __future__ import annotations

import sys

from afdserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["sim-validate", "published", *sys.argv[1:]]))
