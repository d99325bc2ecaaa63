"""AFD simulator: rA-1F bundles (and aggregated and prefill/decode-split baselines) at step
granularity, calibrated from the planner's cost models or a measured profile.

Pure numpy (scipy and matplotlib only where a function needs them); of the runtime it imports
only the torch-free scheduler, which its reference replica drives, and it never loads torch.
What measures the runtime to calibrate it (`afdserve profile`, `afdserve sim-validate runtime`)
lives above it, in `afdserve.calibration`. See docs/simulator.md. The public API:

- costs: `SimCosts` (planner `StageCosts` plus prefill, per-step and KV-transfer costs),
  `roofline_sim_costs`;
- a unit: `BundleConfig`; requests: `RequestSet`, `from_trace`, `from_distributions`,
  `closed_loop`, `closed_loop_from_distributions`, `arrival_times`;
- simulating: `simulate` (the fast step engine), `simulate_closed_loop` (bulk closed loop),
  `simulate_reference` (the reference replica: the runtime's scheduler, slow), `run_unit`;
  deployments: `run_afd`, `run_aggregated`, `run_pd_split`;
- results: `SimRun` (raw arrays), `summarize` -> `SimReport`, `LatencyStats`, `SLO`;
- step timing: `StepLoad`, `decode_load`, `stage_times`, `step_timing`, `microbatch_makespan`.
"""

from afdserve.sim.closed_loop import can_bulk, simulate_closed_loop
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts, roofline_sim_costs
from afdserve.sim.deployments import run_afd, run_aggregated, run_pd_split, run_unit
from afdserve.sim.engine import simulate
from afdserve.sim.metrics import SLO, LatencyStats, SimReport, summarize
from afdserve.sim.pipeline import (
    StageTimes,
    StepLoad,
    StepTiming,
    decode_load,
    microbatch_makespan,
    stage_times,
    step_timing,
)
from afdserve.sim.replica import simulate_reference
from afdserve.sim.requests import (
    RequestSet,
    arrival_times,
    closed_loop,
    closed_loop_from_distributions,
    from_distributions,
    from_trace,
)
from afdserve.sim.run import SimRun

__all__ = [
    "SLO",
    "BundleConfig",
    "LatencyStats",
    "RequestSet",
    "SimCosts",
    "SimReport",
    "SimRun",
    "StageTimes",
    "StepLoad",
    "StepTiming",
    "arrival_times",
    "can_bulk",
    "closed_loop",
    "closed_loop_from_distributions",
    "decode_load",
    "from_distributions",
    "from_trace",
    "microbatch_makespan",
    "roofline_sim_costs",
    "run_afd",
    "run_aggregated",
    "run_pd_split",
    "run_unit",
    "simulate",
    "simulate_closed_loop",
    "simulate_reference",
    "stage_times",
    "step_timing",
    "summarize",
]
