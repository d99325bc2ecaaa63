"""Sizing held to numbers nobody here produced: published AFD deployments (`afdserve
sim-validate published`).

Theory against our own simulator only shows that the two agree with each other. This module
predicts deployments whose throughput was measured and published, with the catalogs and the
documented default efficiencies (`Efficiency()`, never tuned per case), and prints predicted vs
published with the error:

- Step-3 (arXiv 2507.19427), Table 8: 2A2F at 4K context and 4A2F at 8K on H800 under a 50 ms
  TPOT SLO; the prediction is the throughput per GPU at the largest batch that meets the SLO and
  fits in memory, and the planner's best ratio (whole attention nodes per FFN node) is compared
  with the deployed one; a row's F nodes are one FFN instance that all its A nodes share
  (StepMesh: each attention instance sends to every FFN instance);
- FastAFD's measured A:F sweep (linsj20/FastAFD, CODEX_PROJECT_RATIO_EP_SWEEP.md): Qwen3-235B on
  GB200 NVL72, k attention trays and one FFN tray at the measured batch; per context row the
  median error and the best k against the measured best.

Both are stored as data files with their sources (`afdserve/sim/data/*.json`). Every point is
one AFD bundle: r attention workers of `attention_devices` devices with B slots each, one FFN
instance of `ffn_devices` devices. Its step is timed by the simulator's exact microbatch
pipeline (`sim.pipeline`) at mean-field loads (every slot at the row's context), and by the
planner's pipelined cycle (`planner.ratio.stage_times` with M microbatches); the test suite
holds the two within 2% of each other. The link is the deployment's own (`Hardware.link_for`:
NVLink inside one scale-up domain, else the NICs) and the communication term is charged on
whichever side's links carry more tokens per device: the attention side's B per worker, or the
FFN side's r * B over its devices (`busiest_side`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.planner.costs import StageCosts
from afdserve.planner.hardware_catalog import Hardware, load_hardware
from afdserve.planner.model_catalog import ModelSpec, load_model
from afdserve.planner.ratio import stage_times as plan_stage_times
from afdserve.planner.roofline import (
    Efficiency,
    RooflineSetup,
    busiest_side,
    memory_model,
    roofline_costs,
)
from afdserve.sim.costs import SimCosts
from afdserve.sim.pipeline import decode_load, stage_times, step_timing

DATA_DIR = Path(__file__).parent / "data"
MAX_BATCH = 4096


@dataclass(frozen=True)
class Bundle:
    """One rA-1F bundle of a published deployment (devices per side, slots, dtypes, link)."""

    model: ModelSpec
    hardware: Hardware
    ratio: int
    """Attention workers per FFN instance."""
    attention_devices: int
    """Devices per attention worker."""
    ffn_devices: int
    batch: int
    """Slots per attention worker."""
    context: float
    """Context tokens per slot (mean field)."""
    kv_dtype: str
    microbatches: int
    efficiency: Efficiency = field(default_factory=Efficiency)

    @property
    def devices(self) -> int:
        return self.ratio * self.attention_devices + self.ffn_devices

    @property
    def link(self) -> str:
        return self.hardware.link_for(self.devices)

    @property
    def comm_side(self) -> str:
        return busiest_side(self.ratio, self.attention_devices, self.ffn_devices)

    def setup(self) -> RooflineSetup:
        return RooflineSetup(
            batch=self.batch,
            attention_devices=self.attention_devices,
            ffn_devices=self.ffn_devices,
            kv_dtype=self.kv_dtype,
            link=self.link,
            comm_scales_with=self.comm_side,
            efficiency=self.efficiency,
        )

    def costs(self) -> StageCosts:
        return roofline_costs(self.model, self.hardware, self.hardware, self.setup()).costs

    def fits(self) -> bool:
        """Attention: weights + KV of B slots at the context; FFN: weights + activations."""
        mem = memory_model(self.model, self.hardware, self.hardware, self.setup())
        kv = self.batch * self.context * mem.kv_bytes_per_context_token
        ffn_act = self.ratio * self.batch * mem.ffn_bytes_per_token
        return (
            mem.attention_fixed_bytes + kv <= mem.attention_capacity_bytes
            and mem.ffn_fixed_bytes + ffn_act <= mem.ffn_capacity_bytes
        )

    def sim_step_ms(self) -> float:
        """The simulator's step: its exact microbatch pipeline over every layer, each worker's
        B slots at the row's context."""
        costs = self.costs()
        decoding = np.full((1, self.ratio), self.batch)
        context = np.full((1, self.ratio), self.batch * self.context)
        load = decode_load(decoding, context, self.microbatches)
        st = stage_times(SimCosts(costs), load, "microbatch")
        return float(step_timing(st, costs.num_layers, "microbatch").duration[0])

    def plan_step_ms(self) -> float:
        """The planner's step: num_layers x its pipelined cycle with M microbatches."""
        costs = self.costs()
        st = plan_stage_times(costs, self.batch, self.context, self.ratio, self.microbatches)
        return costs.num_layers * st.cycle

    def tps_per_gpu(self, step_ms: float) -> float:
        return self.ratio * self.batch / (step_ms / 1e3) / self.devices


@dataclass(frozen=True)
class Comparison:
    label: str
    published: float
    predicted: float
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "published": self.published,
            "predicted": self.predicted,
            "unit": self.unit,
            "error": self.error,
            **self.detail,
        }


@dataclass(frozen=True)
class PublishedReport:
    efficiency: Efficiency
    step3: tuple[Comparison, ...]
    step3_ratio: tuple[dict[str, Any], ...]
    fastafd: tuple[Comparison, ...]
    fastafd_rows: tuple[dict[str, Any], ...]
    extras: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "efficiency": dataclasses.asdict(self.efficiency),
            "step3": [c.to_dict() for c in self.step3],
            "step3_ratio": list(self.step3_ratio),
            "fastafd": [c.to_dict() for c in self.fastafd],
            "fastafd_rows": list(self.fastafd_rows),
            "extras": list(self.extras),
            "sources": dict(self.sources),
        }


def load_data(name: str) -> dict[str, Any]:
    path = DATA_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read the published data ({exc})") from None


# ---- Step-3 ---------------------------------------------------------------------------------


def best_under_slo(make: Any, slo_ms: float, step: str = "sim") -> tuple[Bundle, float] | None:
    """The largest batch whose step meets the SLO and fits (step time and memory grow with B):
    `make(B)` builds the bundle; returns it with its step time, or None if B = 1 fails."""

    def ok(b: int) -> tuple[bool, float]:
        bundle = make(b)
        if not bundle.fits():
            return False, math.inf
        t = bundle.sim_step_ms() if step == "sim" else bundle.plan_step_ms()
        return t <= slo_ms, t

    good, t = ok(1)
    if not good:
        return None
    lo, hi, t_lo = 1, MAX_BATCH + 1, t
    while hi - lo > 1:
        mid = (lo + hi) // 2
        good, t = ok(mid)
        if good:
            lo, t_lo = mid, t
        else:
            hi = mid
    return make(lo), t_lo


def step3_bundle(
    data: dict[str, Any], point: dict[str, Any], nodes_ratio: int, batch: int, eff: Efficiency
) -> Bundle:
    """One Step-3 row as a bundle: `nodes_ratio` attention nodes per FFN node, every attention
    GPU one worker, and the row's F nodes one FFN instance over all their GPUs (each attention
    instance sends to every FFN instance: StepMesh, `source_topology` in the data file)."""
    g = int(data["gpus_per_node"])
    f = int(point["ffn_nodes"])
    return Bundle(
        model=load_model(data["model"], data["weight_dtype"]),
        hardware=load_hardware(data["hardware"]),
        ratio=nodes_ratio * f * g,  # one attention worker per GPU
        attention_devices=1,
        ffn_devices=f * g,
        batch=batch,
        context=float(point["context"]),
        kv_dtype=data["kv_dtype"],
        microbatches=int(data["microbatches"]),
        efficiency=eff,
    )


def validate_step3(
    data: dict[str, Any], eff: Efficiency
) -> tuple[list[Comparison], list[dict[str, Any]]]:
    slo = float(data["tpot_slo_ms"])
    out, ratios = [], []
    for p in data["points"]:
        deployed = p["attention_nodes"] // p["ffn_nodes"]
        found = best_under_slo(lambda b, p=p, n=deployed: step3_bundle(data, p, n, b, eff), slo)
        if found is None:
            pred, detail = 0.0, {"note": "no batch meets the SLO"}
        else:
            bundle, t = found
            pred = bundle.tps_per_gpu(t)
            detail = {
                "batch_per_gpu": bundle.batch,
                "step_ms": t,
                "plan_step_ms": bundle.plan_step_ms(),
                "link": bundle.link,
                "comm_side": bundle.comm_side,
            }
        out.append(Comparison(p["label"], float(p["tps_per_gpu"]), pred, "tok/s/GPU", detail))
        # the planner's best ratio in whole attention nodes per FFN node
        scores = {}
        for n in range(1, 5):
            best = best_under_slo(lambda b, p=p, n=n: step3_bundle(data, p, n, b, eff), slo, "plan")
            scores[n] = 0.0 if best is None else best[0].tps_per_gpu(best[1])
        best_n = max(scores, key=lambda n: scores[n])
        ratios.append(
            {
                "label": p["label"],
                "deployed_ratio": deployed,
                "planner_best_ratio": best_n,
                "tps_per_gpu_by_ratio": scores,
            }
        )
    return out, ratios


# ---- FastAFD ----------------------------------------------------------------------------------


def fastafd_bundle(data: dict[str, Any], point: dict[str, Any], eff: Efficiency) -> Bundle:
    g = int(data["gpus_per_tray"])
    return Bundle(
        model=load_model(data["model"], data["weight_dtype"]),
        hardware=load_hardware(data["hardware"]),
        ratio=int(point["attention_trays"]) * g,  # one attention worker per GPU
        attention_devices=1,
        ffn_devices=g * int(data["ffn_trays"]),
        batch=int(point["batch_per_worker"]),
        context=float(point["isl"]),
        kv_dtype=data["kv_dtype"],
        microbatches=int(data["microbatches"]),
        efficiency=eff,
    )


def validate_fastafd(
    data: dict[str, Any], eff: Efficiency
) -> tuple[list[Comparison], list[dict[str, Any]]]:
    out: list[Comparison] = []
    by_isl: dict[int, list[Comparison]] = {}
    for p in data["points"]:
        bundle = fastafd_bundle(data, p, eff)
        t = bundle.sim_step_ms()
        c = Comparison(
            f"{p['isl'] // 1024}K A{p['attention_trays']}:F1",
            float(p["tps_per_gpu"]),
            bundle.tps_per_gpu(t),
            "tok/s/GPU",
            {
                "isl": p["isl"],
                "attention_trays": p["attention_trays"],
                "batch_per_worker": bundle.batch,
                "step_ms": t,
                "plan_step_ms": bundle.plan_step_ms(),
                "published_step_ms": p["step_ms"],
                "fits": bundle.fits(),
                "link": bundle.link,
                "comm_side": bundle.comm_side,
            },
        )
        out.append(c)
        by_isl.setdefault(int(p["isl"]), []).append(c)
    rows = []
    for isl, cs in sorted(by_isl.items()):
        errs = [abs(c.error) for c in cs]
        top_pub = max(cs, key=lambda c: c.published)
        top_pred = max(cs, key=lambda c: c.predicted)
        best_pub = top_pub.detail["attention_trays"]
        best_pred = top_pred.detail["attention_trays"]
        timed = [c for c in cs if c.detail["published_step_ms"] is not None]
        rows.append(
            {
                "isl": isl,
                "points": len(cs),
                "median_abs_error": statistics.median(errs),
                "within_10pct": sum(e <= 0.10 for e in errs),
                "best_k_published": best_pub,
                "best_k_predicted": best_pred,
                # how flat the predicted curve is between the two: what the model says the
                # published best k gives up against its own best (0 where they agree)
                "predicted_at_published_best_vs_best": top_pub.predicted / top_pred.predicted - 1,
                # what moves the best k: how fast the step grows with each added tray, over
                # the points the log gives a step time for (least squares, ms per tray)
                "step_ms_per_tray_published": growth_per_tray(timed, "published_step_ms"),
                "step_ms_per_tray_predicted": growth_per_tray(timed, "step_ms"),
                "tokens_per_tray": int(data["gpus_per_tray"]) * cs[0].detail["batch_per_worker"],
            }
        )
    return out, rows


def growth_per_tray(points: list[Comparison], key: str) -> float:
    """Least-squares slope of a step time (`key` in each point's detail) over attention trays."""
    k = np.array([c.detail["attention_trays"] for c in points], dtype=float)
    t = np.array([c.detail[key] for c in points], dtype=float)
    if len(k) < 2 or np.ptp(k) == 0:
        return math.nan
    return float(np.polyfit(k, t, 1)[0])


def aiconfigurator_note() -> str:
    """aiconfigurator's AFD estimate is a benchmark peer in its own venv, never imported here."""
    return (
        "aiconfigurator's AFD estimate: `python benchmarks/bench_vs_aiconfigurator.py` runs it "
        "(its own venv, --install-aiconfigurator) beside this simulator, point by point"
    )


def validate_published(efficiency: Efficiency | None = None) -> PublishedReport:
    """Every published point with `efficiency` (default: the documented `Efficiency()`; pass
    another only to see how sensitive a prediction is, never to fit it)."""
    eff = efficiency or Efficiency()
    s3 = load_data("step3_table8")
    fa = load_data("fastafd_ratio_sweep")
    step3, ratios = validate_step3(s3, eff)
    fast, rows = validate_fastafd(fa, eff)
    return PublishedReport(
        efficiency=eff,
        step3=tuple(step3),
        step3_ratio=tuple(ratios),
        fastafd=tuple(fast),
        fastafd_rows=tuple(rows),
        extras=(aiconfigurator_note(),),
        sources={
            "step3": s3["source"],
            "step3 topology": s3["source_topology"],
            "fastafd": fa["source"],
        },
    )
