"""Simulation vs the real runtime: profile a model on this machine, simulate exactly the runs the
real engine does, run them for real, and compare step time and tokens per second. Real runs
are timed like the profile: the fastest of a few repeats after a warm-up.

A run is a batch of N identical requests (prompt P random token ids, D tokens generated with
`ignore_eos`) submitted at once to `LLM(...).generate`, in one of these shapes:

- `aggregated`: one worker runs both halves (M microbatches, serially);
- `afd`: one attention worker and the FFN worker on threads of this process, exchanging hidden
  states through the in-process transport every layer and microbatch (1A1F, M = 1 or 2).

The simulator gets the same requests (all arriving at 0), the same slot count, token budget and
microbatch count, and the coefficients of the profile (`colocated` pipeline for aggregated,
`microbatch` for AFD). AFD runs are also simulated with the `serial` pipeline: in this process
the attention and FFN workers are threads sharing one interpreter and the same cores, so the
overlap the microbatch pipeline assumes (separate devices) cannot fully happen; the two
predictions bracket what the in-process runtime can do. Real time per step is the `generate` wall time divided by the engine's
steps (so scheduling and Python overhead count, as they do in the simulator's per-step cost).

`RuntimeRun.transport` names the transport: `local` (threads of this process, above) or a
worker-process one (`shm`, `tcp`): then the AFD run is a real `MultiProcessEngine` (an attention
and an FFN worker process, plus this front), simulated with that transport's timed transfer
cost and the per-step overhead the profile measured on worker processes over it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from afdserve.calibration.fit_workers import costs_for_transport
from afdserve.errors import UserInputError
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.engine import simulate
from afdserve.sim.metrics import summarize
from afdserve.sim.requests import RequestSet

IN_PROCESS_TRANSPORTS: tuple[str, ...] = ("local",)
WORKER_EXTRAS: tuple[str, ...] = (
    "afd_alpha",
    "afd_beta",
    "afd_prefill_token_ms",
    "afd_microbatch_ms",
)
"""The profile's worker-process coefficients per transport (`afdserve.calibration.fit_workers`)."""
MULTI_PROCESS_TRANSPORTS: tuple[str, ...] = ("shm", "tcp")
"""Worker-process transports the comparison can time (the profile times their transfers too)."""


@dataclass(frozen=True)
class RuntimeRun:
    mode: str
    """`aggregated` or `afd`."""
    microbatches: int = 1
    attention_workers: int = 1
    transport: str = "local"

    def __post_init__(self) -> None:
        if self.mode not in ("aggregated", "afd"):
            raise UserInputError(f"run mode must be aggregated or afd, got {self.mode!r}")
        allowed = IN_PROCESS_TRANSPORTS + MULTI_PROCESS_TRANSPORTS
        if self.transport not in allowed:
            raise UserInputError(
                f"transport {self.transport!r}: choose one of {', '.join(allowed)}"
            )
        if self.transport != "local" and self.mode != "afd":
            raise UserInputError(
                "worker-process transports run AFD: use mode afd (aggregated is in-process)"
            )
        if self.microbatches < 1 or self.attention_workers < 1:
            raise UserInputError("microbatches and attention_workers must be >= 1")

    @property
    def label(self) -> str:
        if self.mode == "aggregated":
            return f"aggregated M={self.microbatches}"
        return f"AFD {self.attention_workers}A1F M={self.microbatches} ({self.transport})"


DEFAULT_RUNS: tuple[RuntimeRun, ...] = (
    RuntimeRun("aggregated", 1),
    RuntimeRun("afd", 1),
    RuntimeRun("afd", 2),
)


@dataclass(frozen=True)
class Workload:
    requests: int = 16
    prompt_len: int = 64
    output_len: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_len", "output_len", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_num_batched_tokens < self.requests:
            raise UserInputError("max_num_batched_tokens must be >= the number of requests")


@dataclass
class RunComparison:
    run: str
    real_steps: int
    sim_steps: int
    real_step_ms: float
    sim_step_ms: float
    step_ms_error: float
    """sim / real - 1."""
    real_tokens_per_s: float
    sim_tokens_per_s: float
    tokens_per_s_error: float
    sim_serial_step_ms: float | None
    """AFD runs: the simulated step if the bundle's workers share one executor (`serial`
    pipeline: the in-process runtime's threads share the interpreter and the cores)."""
    serial_step_ms_error: float | None
    sim_afd_step_ms: float | None
    """AFD runs: the fixed per-step AFD extra the simulation used (in-process `step.afd_beta`,
    or the `afd_beta` the profile measured over the run's worker-process transport)."""
    sim_step_alpha_ms: float
    """The per-sequence step cost the simulation used (`step.alpha`, plus the transport's
    `afd_alpha` for a worker-process run)."""
    sim_step_prefill_token_ms: float
    """The per-prefill-token step cost the simulation used (`step.prefill_token_ms`, plus the
    transport's `afd_prefill_token_ms` for a worker-process run)."""
    sim_afd_microbatch_ms: float
    """The per-extra-microbatch step cost the simulation used (the transport's
    `afd_microbatch_ms` for a worker-process run, else 0)."""
    real_execute_ms: float
    """Mean of the engine's own per-step execute time (without scheduling)."""
    output_tokens: int
    real_wall_s: float
    load_average: float
    """1-minute load average of this machine right after the kept real run (timing is only
    meaningful when it is below the core count: other load slows thread hand-offs most)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass
class RuntimeValidation:
    model: str
    device: str
    workload: Workload
    profile: dict[str, Any]
    runs: list[RunComparison]
    rounds: int = 1
    interleaved: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """With `interleave`: per worker-process transport, each round's re-timed extras."""

    def to_dict(self) -> dict[str, Any]:
        prof = {k: v for k, v in self.profile.items() if k not in ("points", "transport")}
        prof["worker_steps"] = {  # what calibrates the worker-process runs (profile docstring)
            name: {
                k: t[k]
                for k in (
                    *WORKER_EXTRAS,
                    "worker_step_points",
                    "worker_prefill_points",
                    "worker_step_points_m2",
                    "worker_step_skipped",
                )
                if k in t
            }
            for name, t in self.profile.get("transport", {}).items()
            if any(k.startswith("worker_step") for k in t)
        }
        return {
            "model": self.model,
            "device": self.device,
            "workload": asdict(self.workload),
            "profile": prof,
            "cpu_count": os.cpu_count(),
            "runs": [r.to_dict() for r in self.runs],
            "max_abs_step_error": max(abs(r.step_ms_error) for r in self.runs),
            "max_abs_tokens_per_s_error": max(abs(r.tokens_per_s_error) for r in self.runs),
            "rounds": self.rounds,
            "interleaved": self.interleaved,
        }


def validate_runtime(
    model: str = "builtin:tiny-llama",
    *,
    device: str = "cpu",
    dtype: str = "auto",
    profile: dict[str, Any] | None = None,
    profile_grid: Any = None,
    profile_rounds: int = 1,
    runs: Sequence[RuntimeRun] = DEFAULT_RUNS,
    workload: Workload = Workload(),
    threads: int | None = 1,
    seed: int = 0,
    repeats: int = 3,
    rounds: int = 1,
    pin_workers: bool = False,
    interleave: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> RuntimeValidation:
    """Profile (unless given), then for each run: simulate it and run it for real. With
    `rounds` > 1, every run is measured in each of that many rounds through all runs and keeps
    its fastest (spread over time, as `run_profile(rounds=...)` does). `pin_workers`: worker
    processes pinned to cores (`EngineConfig.pin_workers`), in the profile and the real runs.

    `interleave`: in every round, the worker-process extras (WORKER_EXTRAS) are timed again
    right before that round's worker-process runs (`remeasure_worker_extras`, against the
    profile's in-process fits), and the runs are simulated with each coefficient's median over
    the rounds (so a round disturbed in one coefficient does not carry the others with it):
    prediction and measurement then come from the same stretch of time on a machine whose
    multi-process rate drifts."""
    import torch

    from afdserve.calibration.grid import ProfileGrid
    from afdserve.calibration.profile import check_profile, remeasure_worker_extras, run_profile

    note = progress or (lambda _s: None)
    if threads is not None:
        torch.set_num_threads(threads)
    multi = sorted({r.transport for r in runs} - {"local"})
    if profile is None:
        note("profiling")
        profile = run_profile(
            model,
            device=device,
            dtype=dtype,
            grid=profile_grid or ProfileGrid(),
            transports=("local", "copy", *multi),
            threads=threads,
            rounds=profile_rounds,
            pin_workers=pin_workers,
        )
    check_profile(profile)
    costs_by_transport = {t: costs_for_transport(profile, t) for t in {r.transport for r in runs}}
    measured: dict[RuntimeRun, list[dict[str, Any]]] = {}
    round_extras: dict[str, list[dict[str, Any]]] = {}  # interleave: each round's re-timing
    for k in range(rounds):
        tag = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
        if interleave:
            for t in multi:
                note(f"worker-process extras over {t}" + tag)
                timed = remeasure_worker_extras(
                    profile, model, t, grid=profile_grid or ProfileGrid(), device=device,
                    dtype=dtype, threads=threads, pin_workers=pin_workers,
                )  # fmt: skip
                round_extras.setdefault(t, []).append({key: timed[key] for key in WORKER_EXTRAS})
        for run in runs:
            note(f"real: {run.label}" + tag)
            real = _real_run(model, run, workload, device, dtype, seed, repeats, pin_workers)
            real["load"] = _load_average()
            measured.setdefault(run, []).append(real)
    reals = {run: _combine(rs, typical=run.transport != "local") for run, rs in measured.items()}
    for t, extras in round_extras.items():  # each coefficient's median over the rounds, so a
        # round disturbed in one of them does not carry the others with it
        med = {key: float(np.median([e[key] for e in extras])) for key in WORKER_EXTRAS}
        timed = {**profile["transport"][t], **med}
        costs_by_transport[t] = costs_for_transport(
            {**profile, "transport": {**profile["transport"], t: timed}}, t
        )
    out: list[RunComparison] = []
    for run in runs:
        real = reals[run]
        note(f"simulated: {run.label}")
        costs = costs_by_transport[run.transport]
        sim = _sim_run(costs, run, workload)
        serial = _sim_run(costs, run, workload, "serial") if run.mode == "afd" else None
        out.append(
            RunComparison(
                run=run.label,
                real_steps=real["steps"],
                sim_steps=sim["steps"],
                real_step_ms=real["step_ms"],
                sim_step_ms=sim["step_ms"],
                step_ms_error=sim["step_ms"] / real["step_ms"] - 1.0,
                real_tokens_per_s=real["tokens_per_s"],
                sim_tokens_per_s=sim["tokens_per_s"],
                tokens_per_s_error=sim["tokens_per_s"] / real["tokens_per_s"] - 1.0,
                sim_serial_step_ms=None if serial is None else serial["step_ms"],
                serial_step_ms_error=(
                    None if serial is None else serial["step_ms"] / real["step_ms"] - 1.0
                ),
                sim_afd_step_ms=costs.afd_step_ms if run.mode == "afd" else None,
                sim_step_alpha_ms=costs.step_alpha_ms,
                sim_step_prefill_token_ms=costs.step_prefill_token_ms,
                sim_afd_microbatch_ms=costs.afd_microbatch_ms,
                real_execute_ms=real["execute_ms"],
                output_tokens=real["tokens"],
                real_wall_s=real["wall_s"],
                load_average=real["load"],
            )
        )
    return RuntimeValidation(
        model, str(profile.get("device")), workload, profile, out, rounds, round_extras
    )


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # not available on this platform
        return math.nan


def _engine_options(
    run: RuntimeRun, w: Workload, device: str, dtype: str, pin_workers: bool = False
) -> dict[str, Any]:
    return dict(
        pin_workers=pin_workers and run.transport != "local",
        mode=run.mode,
        attention_workers=run.attention_workers,
        microbatches=run.microbatches,
        max_num_seqs=w.requests,
        max_num_batched_tokens=w.max_num_batched_tokens,
        max_model_len=w.prompt_len + w.output_len + 16,
        device=device,
        dtype=dtype,
        transport=run.transport,
    )


def _real_run(
    model: str,
    run: RuntimeRun,
    w: Workload,
    device: str,
    dtype: str,
    seed: int,
    repeats: int,
    pin_workers: bool = False,
) -> dict[str, Any]:
    """The fastest of `repeats` timed `generate` calls after one untimed call of the same batch
    (the least disturbed by other load, as the profile's timings); `step_ms_each` has every
    repeat's time per step (for the median `_combine` takes of worker-process runs)."""
    from afdserve.llm import LLM
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig
    from afdserve.types import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = ModelConfig.from_dir(resolve_model(model)).vocab_size
    llm = LLM(model, **_engine_options(run, w, device, dtype, pin_workers))
    try:
        params = SamplingParams(max_tokens=w.output_len, temperature=0.0, ignore_eos=True)
        prompts = [rng.integers(3, vocab, size=w.prompt_len).tolist() for _ in range(w.requests)]
        llm.generate(prompts, params)  # warm-up: the same shapes as the timed runs
        walls, n_steps, execute, each = [], 0, [], []
        in_process = hasattr(llm.engine, "step_times")
        for _ in range(repeats):
            if in_process:
                llm.engine.step_times.clear()  # a bounded deque of the engine's recent step times
            before = _worker_steps(llm.engine)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            walls.append(time.perf_counter() - t0)
            if in_process:
                steps = list(llm.engine.step_times)
                n_steps = len(steps)
                execute.append(float(np.mean(steps)) if steps else math.nan)
            else:  # worker processes: their own step counters, reported with every step
                n_steps = _worker_steps(llm.engine) - before
                execute.append(math.nan)
            each.append(walls[-1] * 1e3 / max(n_steps, 1))
    finally:
        llm.close()
    tokens = sum(len(o.token_ids) for o in outs)
    wall = float(np.min(walls))
    return {
        "steps": n_steps,
        "step_ms": wall * 1e3 / max(n_steps, 1),
        "execute_ms": float(np.min(execute)) * 1e3,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "step_ms_each": each,
    }


def _combine(reals: list[dict[str, Any]], typical: bool) -> dict[str, Any]:
    """One figure from the rounds of a run. In-process: the fastest round (its fastest repeat:
    the least disturbed, as the profile's points). Worker processes: the median over every
    timed repeat of every round, as the profile's worker-process steps: their rate wanders
    from run to run with where the scheduler puts three processes on few cores, so the
    fastest of many runs is a rare one, not what the runtime does."""
    if not typical:
        return min(reals, key=lambda r: r["wall_s"])
    per_step = sorted(ms for r in reals for ms in r["step_ms_each"])
    step_ms = float(np.median(per_step))
    kept = min(reals, key=lambda r: abs(r["step_ms"] - step_ms))
    return {
        **kept,
        "step_ms": step_ms,
        "tokens_per_s": kept["tokens"] / (step_ms * kept["steps"] / 1e3),
    }


def _worker_steps(engine: Any) -> int:
    """Steps attention worker 0 has run (the runs compared here have one attention worker)."""
    return int(engine.state(afd=False).workers[0].counters.get("steps", 0))


def _sim_run(
    costs: SimCosts, run: RuntimeRun, w: Workload, pipeline: str | None = None
) -> dict[str, Any]:
    config = BundleConfig(
        attention_workers=run.attention_workers if run.mode == "afd" else 1,
        slots=w.requests,
        microbatches=run.microbatches,
        pipeline=pipeline or ("microbatch" if run.mode == "afd" else "colocated"),
        prefill="chunked",
        token_budget=w.max_num_batched_tokens,
    )
    n = w.requests
    reqs = RequestSet(
        np.full(n, w.prompt_len), np.full(n, w.output_len), np.zeros(n), name="runtime batch"
    )
    result = simulate(costs, config, reqs)
    rep = summarize([result])
    return {
        "steps": result.num_steps,
        "step_ms": float(result.step_duration.mean()),
        "tokens_per_s": rep.throughput_tok_s,
    }
