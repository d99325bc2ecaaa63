"""`plan()`: the whole ratio decision for one batch size, as one frozen, JSON-ready result.

It combines the closed form (ratio.py), the barrier refinement (barrier.py), the microbatch rule
(microbatch.py) and the TPOT/memory constraints (feasibility.py) over a per-r table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from afdserve.errors import UserInputError
from afdserve.planner.barrier import expected_cycle_time
from afdserve.planner.costs import StageCosts
from afdserve.planner.feasibility import (
    MemoryReport,
    attention_fits,
    ffn_fits,
    memory_report,
    tpot_ok,
)
from afdserve.planner.microbatch import MicrobatchPlan, plan_microbatches
from afdserve.planner.ratio import (
    CostWeights,
    best_integer,
    check_inputs,
    closed_form,
    objective,
    stage_times,
    throughput_per_instance,
)
from afdserve.planner.roofline import MemoryModel
from afdserve.planner.stats import WorkloadStats

MAX_TABLE_R = 1024


@dataclass(frozen=True)
class RatioRow:
    """One candidate ratio r: per-layer stage times (ms), cycle, objective and feasibility."""

    r: int
    t_attention: float
    t_ffn: float
    t_comm: float
    cycle_ms: float
    """Mean-field tau = max of the three stage times (per layer)."""
    step_ms: float
    """num_layers * tau: the time per output token (TPOT) of every request."""
    throughput_per_instance: float
    """r*B / ((r+1) * step_ms): tokens per ms per instance."""
    throughput_per_cost: float
    """r*B / ((r*c_A + c_F) * step_ms): tokens per ms per unit of cost weight."""
    attention_idle: float
    """Fraction of the cycle an attention instance waits: 1 - tA / tau."""
    ffn_idle: float
    """Fraction of the cycle the FFN waits: 1 - tF / tau."""
    tpot_ok: bool
    memory_ok: bool | None
    expected_cycle_ms: float | None = None
    """Barrier-aware E[tau] (needs sigma2)."""
    throughput_per_instance_barrier: float | None = None
    throughput_per_cost_barrier: float | None = None
    tpot_ok_barrier: bool | None = None

    @property
    def feasible(self) -> bool:
        return self.tpot_ok and self.memory_ok is not False

    @property
    def feasible_barrier(self) -> bool:
        return bool(self.tpot_ok_barrier) and self.memory_ok is not False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class PlanResult:
    costs: StageCosts
    batch: int
    workload: WorkloadStats
    weights: CostWeights
    tpot_slo_ms: float | None
    r_a: float
    r_c: float
    r_peak: float
    r_star: float
    r_int_unconstrained: int
    """The closed form's integer (floor or ceil of r*), ignoring SLO and memory."""
    r_int: int | None
    """Best mean-field integer ratio that meets the SLO and memory; None if none does."""
    r_int_barrier: int | None
    """Best integer ratio under the barrier model (None without sigma2 or if infeasible)."""
    microbatches: MicrobatchPlan | None
    memory: MemoryReport | None
    table: tuple[RatioRow, ...]
    notes: tuple[str, ...] = ()
    pipeline_microbatches: int | None = None
    """M the rows are timed with (each microbatch paying the fixed costs); None: the ideal
    model (perfect overlap, fixed costs once a layer)."""

    @property
    def theta(self) -> float:
        return self.workload.theta

    def row(self, r: int) -> RatioRow:
        for row in self.table:
            if row.r == r:
                return row
        raise KeyError(r)

    def to_dict(self) -> dict[str, Any]:
        mb = None
        if self.microbatches is not None:
            mb = {
                "m": self.microbatches.microbatches,
                "tc_over_tf": self.microbatches.tc_over_tf,
                "t_attention": self.microbatches.t_attention,
                "t_ffn": self.microbatches.t_ffn,
                "t_comm": self.microbatches.t_comm,
            }
        return _finite(
            {
                "theta": self.workload.theta,
                "sigma2": self.workload.sigma2,
                "workload": self.workload.to_dict(),
                "batch": self.batch,
                "num_layers": self.costs.num_layers,
                "units": "ms (per layer unless named step_ms), tokens",
                "coefficients": self.costs.to_profile_dict(),
                "objective": {
                    "unit": self.weights.unit,
                    "attention_weight": self.weights.attention,
                    "ffn_weight": self.weights.ffn,
                },
                "tpot_slo_ms": self.tpot_slo_ms,
                "r_a": self.r_a,
                "r_c": self.r_c,
                "r_peak": self.r_peak,
                "r_star": self.r_star,
                "r_int_unconstrained": self.r_int_unconstrained,
                "r_int": self.r_int,
                "r_int_barrier": self.r_int_barrier,
                "microbatches": mb,
                "pipeline_microbatches": self.pipeline_microbatches,
                "memory": None if self.memory is None else self.memory.to_dict(),
                "table": [row.to_dict() for row in self.table],
                "notes": list(self.notes),
            }
        )


def plan(
    costs: StageCosts,
    batch: int,
    workload: WorkloadStats,
    *,
    weights: CostWeights = CostWeights(),
    tpot_slo_ms: float | None = None,
    memory: MemoryModel | None = None,
    r_max: int | None = None,
    microbatches: int | None = None,
) -> PlanResult:
    """Plan the Attention/FFN ratio of an rA-1F bundle with B = `batch` slots per attention
    instance for a workload with step-weighted context `workload.theta` (and variance sigma2).

    `microbatches=M` times every row as the simulator does: M ping-pong microbatches, each
    paying the fixed costs (the FFN's weight read, beta_F, once per microbatch), cycle =
    max(M t_A, M t_F, M t_C, one microbatch's round trip) (`ratio.stage_times`); the closed form
    and the barrier use the per-layer loads (every beta times M). `None` keeps the ideal model
    of the paper (perfect overlap, one weight read per layer), which is optimistic by up to
    (M - 1) * beta_F a layer."""
    theta = workload.theta
    check_inputs(costs, batch, theta)
    if microbatches is not None and (
        isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1
    ):
        raise UserInputError(f"microbatches must be an integer >= 1, got {microbatches!r}")
    loads = costs if microbatches is None else costs.per_layer_loads(microbatches)
    if tpot_slo_ms is not None and not (math.isfinite(tpot_slo_ms) and tpot_slo_ms > 0):
        raise UserInputError(f"TPOT SLO must be > 0 ms, got {tpot_slo_ms!r}")
    if r_max is not None and (isinstance(r_max, bool) or not isinstance(r_max, int) or r_max < 1):
        raise UserInputError(f"r_max must be an integer >= 1, got {r_max!r}")
    L = costs.num_layers
    notes: list[str] = []
    cf = closed_form(loads, batch, theta, weights)

    def times(r: int):
        return stage_times(costs, batch, theta, r, microbatches)

    def score(r: int) -> float:
        return objective(r, batch, times(r).cycle, L, weights)

    r_int_free = best_integer(cf.r_star, score)
    if r_max is None:
        r_max = max(8, 2 * math.ceil(cf.r_star) + 2)
        if r_max > MAX_TABLE_R:
            notes.append(f"r* = {cf.r_star:.4g}: table cut at r = {MAX_TABLE_R}")
            r_max = MAX_TABLE_R

    attention_ok = None if memory is None else attention_fits(memory, batch, theta)
    if attention_ok is False:
        notes.append("attention side out of memory at this batch: no ratio is feasible")
    sigma2 = workload.sigma2

    def make_row(r: int, barrier: bool) -> RatioRow:
        st = times(r)
        tau = st.cycle
        mem_ok = None if memory is None else bool(attention_ok and ffn_fits(memory, batch, r))
        row: dict[str, Any] = dict(
            r=r,
            t_attention=st.attention,
            t_ffn=st.ffn,
            t_comm=st.comm,
            cycle_ms=tau,
            step_ms=L * tau,
            throughput_per_instance=throughput_per_instance(r, batch, tau, L),
            throughput_per_cost=objective(r, batch, tau, L, weights),
            attention_idle=1.0 - st.attention / tau,
            ffn_idle=1.0 - st.ffn / tau,
            tpot_ok=tpot_ok(tau, L, tpot_slo_ms),
            memory_ok=mem_ok,
        )
        if barrier and sigma2 is not None:
            e_tau = max(expected_cycle_time(loads, batch, theta, sigma2, r), st.round_trip)
            row.update(
                expected_cycle_ms=e_tau,
                throughput_per_instance_barrier=throughput_per_instance(r, batch, e_tau, L),
                throughput_per_cost_barrier=objective(r, batch, e_tau, L, weights),
                tpot_ok_barrier=tpot_ok(e_tau, L, tpot_slo_ms),
            )
        return RatioRow(**row)

    rows = [make_row(r, barrier=True) for r in range(1, r_max + 1)]
    table = tuple(rows)

    feasible = [row for row in table if row.feasible]
    free_row = table[r_int_free - 1] if r_int_free <= r_max else make_row(r_int_free, False)
    if free_row.feasible and r_int_free > r_max:
        feasible.append(free_row)
        notes.append(f"r = {r_int_free} lies beyond the table (r_max = {r_max})")
    r_int: int | None = None
    if feasible:
        # the table, not the closed form, decides: with microbatches a layer also waits for
        # one microbatch's round trip, which the closed form's per-layer loads leave out
        r_int = max(feasible, key=lambda row: row.throughput_per_cost).r
        if r_int != r_int_free and free_row.feasible:
            notes.append(
                f"the closed form's r = {r_int_free} leaves out one microbatch's A -> F -> A "
                f"round trip, which bounds the cycle; best r in the table = {r_int}"
            )
        elif r_int != r_int_free:
            why = "is beyond r_max" if r_int_free > r_max else "breaks the TPOT SLO or memory"
            notes.append(f"r = {r_int_free} {why}; best feasible r in the table = {r_int}")
    elif tpot_slo_ms is not None and not table[0].tpot_ok:
        notes.append(
            f"no ratio meets the TPOT SLO: even r = 1 takes {table[0].step_ms:.3g} ms a step"
        )

    r_int_barrier = None
    if sigma2 is not None:
        ok = [row for row in table if row.feasible_barrier]
        if ok:
            best = max(ok, key=lambda row: row.throughput_per_cost_barrier or 0.0)
            r_int_barrier = best.r
            if best.r == r_max and len(table) > 1:
                notes.append("barrier optimum at the table's edge; raise r_max to look further")

    r_for_details = r_int if r_int is not None else r_int_free
    return PlanResult(
        costs=costs,
        batch=batch,
        workload=workload,
        weights=weights,
        tpot_slo_ms=tpot_slo_ms,
        r_a=cf.r_a,
        r_c=cf.r_c,
        r_peak=cf.r_peak,
        r_star=cf.r_star,
        r_int_unconstrained=r_int_free,
        r_int=r_int,
        r_int_barrier=r_int_barrier,
        microbatches=plan_microbatches(costs, batch, theta, r_for_details),
        memory=None if memory is None else memory_report(memory, batch, theta, r_for_details),
        table=table,
        notes=tuple(notes),
        pipeline_microbatches=microbatches,
    )


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: replace them with None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
