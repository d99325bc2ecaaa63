"""Ratio planner: how many attention instances should share one FFN instance (rA-1F).

Pure Python (numpy, scipy lazily): importing it never loads torch, so it runs anywhere in
milliseconds. The public API:

- workloads: `Trace`, `load_trace`, `trace_from_lengths`, `traces_dir`, `NAMED_WORKLOADS`;
  `WorkloadStats`, `stats_from_trace`, `stats_from_lengths`, `stats_from_distributions`,
  `parse_distribution`;
- stage costs: `Affine`, `StageCosts` (`.explicit`, `.from_profile`, `.from_profile_dict`,
  `.to_profile_dict`), `roofline_costs` with `RooflineSetup` / `Efficiency`;
- catalogs: `load_model` / `model_catalog`, `load_hardware` / `hardware_catalog`;
- decisions: `plan` -> `PlanResult`, plus the pieces `closed_form`, `expected_cycle_time`,
  `expected_max_std_normal`, `min_microbatches`, `unit_costs`.

See docs/planner.md for the model and its derivation.
"""

from afdserve.planner.barrier import (
    expected_cycle_time,
    expected_max_std_normal,
    expected_max_with_floor,
)
from afdserve.planner.costs import Affine, StageCosts
from afdserve.planner.distributions import parse_distribution
from afdserve.planner.hardware_catalog import Hardware, hardware_catalog, load_hardware
from afdserve.planner.microbatch import min_microbatches, plan_microbatches
from afdserve.planner.model_catalog import ModelSpec, load_model, model_catalog
from afdserve.planner.plan import PlanResult, RatioRow, plan
from afdserve.planner.ratio import CostWeights, closed_form, continuous_optimum, stage_times
from afdserve.planner.roofline import (
    Efficiency,
    MemoryModel,
    RooflineSetup,
    memory_model,
    roofline_costs,
    unit_costs,
)
from afdserve.planner.stats import (
    WorkloadStats,
    stats_from_distributions,
    stats_from_lengths,
    stats_from_trace,
)
from afdserve.planner.workload import (
    NAMED_WORKLOADS,
    Trace,
    load_trace,
    trace_files,
    trace_from_lengths,
    traces_dir,
)

__all__ = [
    "NAMED_WORKLOADS",
    "Affine",
    "CostWeights",
    "Efficiency",
    "Hardware",
    "MemoryModel",
    "ModelSpec",
    "PlanResult",
    "RatioRow",
    "RooflineSetup",
    "StageCosts",
    "Trace",
    "WorkloadStats",
    "closed_form",
    "continuous_optimum",
    "expected_cycle_time",
    "expected_max_std_normal",
    "expected_max_with_floor",
    "hardware_catalog",
    "load_hardware",
    "load_model",
    "load_trace",
    "memory_model",
    "min_microbatches",
    "model_catalog",
    "parse_distribution",
    "plan",
    "plan_microbatches",
    "roofline_costs",
    "stage_times",
    "stats_from_distributions",
    "stats_from_lengths",
    "stats_from_trace",
    "trace_files",
    "trace_from_lengths",
    "traces_dir",
    "unit_costs",
]
