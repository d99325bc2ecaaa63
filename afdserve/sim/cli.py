"""`afdserve simulate`, `afdserve profile` and `afdserve sim-validate theory|runtime`.

Nothing heavy at module level: numpy and the simulator load inside the verb functions, torch
only for `profile` and `sim-validate runtime`, matplotlib only with `--plot`. Bad input raises
UserInputError, which `afdserve.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from afdserve.cli import one_line_errors
from afdserve.errors import UserInputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_simulate(subparsers)
    _add_profile(subparsers)
    _add_validate(subparsers)


def _int_list(text: str) -> tuple[int, ...]:
    """'1-16' or '1,2,4' or '1-4,8' -> a tuple of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 1-16 or 1,2,4, got {text!r}"
        ) from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return tuple(sorted(set(out)))


def _progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on a terminal (stderr), nothing otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False)


# ---- simulate ---------------------------------------------------------------------------------


def _add_simulate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate AFD, aggregated and PD-split deployments; search the best under SLOs",
        description=(
            "Search AFD splits (attention/FFN instances, microbatches, batch per worker), "
            "aggregated and prefill/decode-split deployments of a model on N devices for a "
            "workload, and print the best of each under the TTFT and TPOT SLOs. With --ratio, "
            "simulate one AFD bundle instead. See docs/simulator.md."
        ),
    )
    p.add_argument("--model", help="catalog model name or HF config.json / directory")
    p.add_argument("--hardware", help="catalog hardware name (every device)")
    p.add_argument("--profile", metavar="FILE", help="measured profile JSON (with --ratio)")
    p.add_argument("--gpus", type=int, help="devices to deploy on (search)")
    p.add_argument(
        "--workload", required=True, metavar="NAME_OR_FILE", help="named trace or trace file"
    )
    p.add_argument("--ttft-slo-ms", type=float, help="TTFT SLO (ms)")
    p.add_argument("--tpot-slo-ms", type=float, help="TPOT SLO (ms)")
    p.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet the SLOs (0.9)",
    )
    p.add_argument(
        "--requests", type=int, default=1000, help="requests of the trace to replay (1000)"
    )
    p.add_argument(
        "--ratios", type=_int_list, default=tuple(range(1, 17)), help="r to search (1-16)"
    )
    p.add_argument(
        "--batches",
        type=_int_list,
        default=(32, 64, 128, 256),
        help="slots per attention worker / instance (32,64,128,256)",
    )
    p.add_argument("--microbatches", type=_int_list, default=(1, 2, 4), help="M to search (1,2,4)")
    p.add_argument(
        "--token-budget", type=int, default=2048, help="tokens a worker computes per step (2048)"
    )
    p.add_argument(
        "--finalists", type=int, default=2, help="candidates per family simulated in full (2)"
    )
    p.add_argument(
        "--ratio", type=int, help="simulate one AFD bundle with this r instead of searching"
    )
    p.add_argument(
        "--batch", type=int, default=64, help="with --ratio: slots per attention worker (64)"
    )
    p.add_argument(
        "--rate", type=float, help="with --ratio: requests/s (default: the trace's timestamps)"
    )
    p.add_argument("--closed-loop", action="store_true", help="with --ratio: saturated closed loop")
    p.add_argument(
        "--engine",
        choices=("fast", "reference"),
        default="fast",
        help="with --ratio: `fast`, the step engine (default), or `reference`, the replica that "
        "drives the runtime's scheduler (slower, open loop only)",
    )
    p.add_argument(
        "--arrivals",
        choices=("trace", "poisson", "gamma"),
        default="trace",
        help="with --ratio: the trace's timestamps (rescaled by --rate), or Poisson/Gamma at --rate",
    )
    p.add_argument(
        "--cv", type=float, default=1.0, help="Gamma inter-arrival coefficient of variation (1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_simulate)
    one_line_errors(p)


def run_simulate(args: argparse.Namespace) -> int:
    from afdserve.sim.metrics import SLO

    for flag in ("ttft_slo_ms", "tpot_slo_ms", "rate"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserInputError(f"--{flag.replace('_', '-')} must be a number > 0, got {v}")
    if args.requests < 1:
        raise UserInputError(f"--requests must be >= 1, got {args.requests}")
    if not 0 < args.attainment <= 1:
        raise UserInputError(f"--attainment must be in (0, 1], got {args.attainment}")
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    if args.ratio is not None:
        return _simulate_one(args, slo)
    if args.engine != "fast":
        raise UserInputError("--engine reference goes with --ratio (the search runs the fast one)")
    missing = [f for f in ("model", "hardware", "gpus") if getattr(args, f) is None]
    if missing:
        raise UserInputError(
            "the search needs " + ", ".join("--" + m for m in missing) + " (or use --ratio)"
        )
    if args.profile:
        raise UserInputError(
            "--profile goes with --ratio (the search derives costs per device count)"
        )
    if args.gpus < 1:
        raise UserInputError(
            f"--gpus must be >= 1: there are no devices to deploy on ({args.gpus})"
        )
    if args.ttft_slo_ms is None or args.tpot_slo_ms is None:
        raise UserInputError("the search needs both --ttft-slo-ms and --tpot-slo-ms")
    from afdserve.sim.search import SearchSpace, search

    space = SearchSpace(
        ratios=args.ratios,
        microbatches=args.microbatches,
        batches=args.batches,
        token_budget=args.token_budget,
        finalists=args.finalists,
        attainment=args.attainment,
    )
    bars: dict[str, Any] = {}

    def tick(stage: str, n: int) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            desc = "screening" if stage == "screen" else "simulating finalists"
            bars[stage] = _progress(0, desc, args.quiet)
        bars[stage].update(n)

    try:
        result = search(
            args.model,
            args.hardware,
            args.gpus,
            args.workload,
            slo,
            space=space,
            requests=args.requests,
            seed=args.seed,
            progress=tick,
        )
    finally:
        for b in bars.values():
            b.close()
    if args.plot:
        _search_plots(result, Path(args.plot), args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=_json_default))
    else:
        print(_render_search(result))
    return 0


def _render_search(result: Any) -> str:
    lines = [
        f"{result.model} on {result.devices} x {result.hardware}, workload {result.workload}: "
        f"SLO TTFT <= {result.slo.ttft_ms} ms, TPOT <= {result.slo.tpot_ms} ms for "
        f"{result.space.attainment:.0%} of requests ({len(result.screened)} candidates screened)",
        "",
        f"{'family':<11} {'devices':>7} {'goodput tok/s':>13} {'per device':>10} "
        f"{'tok/s/user':>10} {'TTFT p90':>9} {'TPOT p90':>9} {'attain':>6}  configuration",
    ]
    for fam, c in result.best.items():
        if c is None or c.report is None:
            lines.append(f"{fam:<11} {'-':>7}  no configuration meets the SLOs")
            continue
        rep = c.report
        lines.append(
            f"{fam:<11} {c.devices:>7d} {rep.goodput_tok_s or 0:>13.0f} "
            f"{(rep.goodput_tok_s or 0) / c.devices:>10.0f} {rep.tokens_per_user_s:>10.1f} "
            f"{rep.ttft_ms.p90:>9.1f} {rep.tpot_ms.p90:>9.2f} {rep.slo_attainment or 0:>6.2f}  "
            f"{c.describe()} @ {c.max_rate:.3g} req/s"
        )
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _search_plots(result: Any, out: Path, seed: int) -> None:
    from afdserve.planner import load_trace, plan, stats_from_trace
    from afdserve.sim.closed_loop import simulate_closed_loop
    from afdserve.sim.config import BundleConfig
    from afdserve.sim.pipeline import StageTimes
    from afdserve.sim.plots import plot_latency_cdfs, plot_ratio_sweep, plot_timeline
    from afdserve.sim.validate_theory import RatioSweep, WorkloadCase, workload_source

    out.mkdir(parents=True, exist_ok=True)
    samples = {
        f"{fam}: {c.describe()}": c.samples for fam, c in result.best.items() if c and c.samples
    }
    if samples:
        plot_latency_cdfs(
            samples,
            out / "latency_cdf.png",
            slo={"ttft_ms": result.slo.ttft_ms, "tpot_ms": result.slo.tpot_ms},
            title=f"{result.model} on {result.hardware}, {result.workload} (best of each family)",
        )
    afd = result.best.get("afd") or next((c for c in result.finalists if c.family == "afd"), None)
    if afd is None:
        return
    trace = load_trace(result.workload)
    stats = stats_from_trace(trace)
    _, make = workload_source(WorkloadCase(result.workload, trace=result.workload))
    B, M = afd.params["batch"], afd.params["microbatches"]
    p = plan(afd.costs.stages, B, stats, r_max=max(result.space.ratios))
    sweep = RatioSweep(
        afd.costs,
        B,
        stats,
        make,
        steps=result.space.closed_loop_steps,
        seed=seed,
        pipeline="microbatch",
        microbatches=M,
        table=p.table,
    )
    points = [sweep.run(r) for r in result.space.ratios]
    plot_ratio_sweep(
        points,
        out / "ratio_sweep.png",
        title=f"{result.model} on {result.hardware}, {result.workload}: B={B}, M={M} "
        "(simulated: exact microbatch pipeline; closed form: planner)",
        marks={"r*": p.r_star},
    )
    r = afd.params["r"]
    cfg = BundleConfig(
        attention_workers=r, slots=B, microbatches=M, pipeline="microbatch", prefill="none"
    )
    reqs = make(r * B, 4 * r * B, seed)
    run = simulate_closed_loop(afd.costs, cfg, reqs, max_steps=3, timeline_steps=3)
    if run.timeline:
        plot_timeline(
            StageTimes.concat(run.timeline),
            afd.costs.num_layers,
            out / "timeline.png",
            steps=2,
            title=f"{r}A1F, M={M}, B={B}: two steps in steady state ({result.workload})",
        )


def _simulate_one(args: argparse.Namespace, slo: Any) -> int:
    from afdserve.planner import RooflineSetup, load_hardware, load_model, load_trace
    from afdserve.sim.config import BundleConfig
    from afdserve.sim.costs import SimCosts, roofline_sim_costs
    from afdserve.sim.deployments import run_unit
    from afdserve.sim.metrics import summarize
    from afdserve.sim.requests import closed_loop, from_trace

    if args.ratio < 1 or args.batch < 1:
        raise UserInputError("--ratio and --batch must be >= 1")
    M = args.microbatches[0] if len(args.microbatches) == 1 else 1
    if args.profile:
        if args.model or args.hardware:
            raise UserInputError("give stage costs one way: --profile, or --model with --hardware")
        costs = SimCosts.from_profile(args.profile)
    elif args.model and args.hardware:
        hw = load_hardware(args.hardware)
        costs = roofline_sim_costs(load_model(args.model), hw, hw, RooflineSetup(batch=args.batch))
    else:
        raise UserInputError("--ratio needs stage costs: --profile FILE, or --model and --hardware")
    trace = load_trace(args.workload)
    cfg = BundleConfig(
        attention_workers=args.ratio,
        slots=args.batch,
        microbatches=M,
        pipeline="microbatch",
        prefill="none" if args.closed_loop else "chunked",
        token_budget=max(args.token_budget, args.batch),
    )
    if args.closed_loop:
        reqs = closed_loop(
            trace.prompt_len,
            trace.output_len,
            num_slots=cfg.num_slots,
            num_requests=max(args.requests, 4 * cfg.num_slots),
            seed=args.seed,
            name=trace.name,
        )
    else:
        arrivals = args.arrivals
        if arrivals == "trace" and trace.arrival_s is None:
            raise UserInputError(
                f"trace {trace.name!r} has no timestamps: use --arrivals poisson --rate R"
            )
        if arrivals != "trace" and args.rate is None:
            raise UserInputError(f"--arrivals {arrivals} needs --rate (requests/s)")
        reqs = from_trace(
            trace,
            limit=args.requests,
            arrivals=arrivals,
            rate=args.rate,
            cv=args.cv,
            seed=args.seed,
        )
    run = run_unit(costs, cfg, reqs, closed_loop=args.closed_loop, engine=args.engine)
    rep = summarize([run], label=f"{args.ratio}A1F M={M} B={args.batch}", slo=slo)
    if args.plot:
        import dataclasses

        from afdserve.sim.pipeline import StageTimes
        from afdserve.sim.plots import latency_samples, plot_latency_cdfs, plot_timeline

        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        # the timeline in steady state: a short closed loop of the same bundle
        steady = closed_loop(
            trace.prompt_len,
            trace.output_len,
            num_slots=cfg.num_slots,
            num_requests=4 * cfg.num_slots,
            seed=args.seed,
        )
        cl = run_unit(
            costs,
            dataclasses.replace(cfg, prefill="none"),
            steady,
            closed_loop=True,
            max_steps=3,
            timeline_steps=3,
        )
        plot_timeline(
            StageTimes.concat(cl.timeline),
            costs.num_layers,
            out / "timeline.png",
            steps=2,
            title=f"{rep.label}: two steps in steady state (closed loop, {trace.name})",
        )
        plot_latency_cdfs(
            {rep.label: latency_samples([run])},
            out / "latency_cdf.png",
            slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2, default=_json_default))
    else:
        print(_render_report(rep))
    return 0


def _render_report(rep: Any) -> str:
    def lat(s: Any) -> str:
        return f"mean {s.mean:.4g}  median {s.median:.4g}  p90 {s.p90:.4g}  p99 {s.p99:.4g} ms"

    lines = [
        f"{rep.label}: {rep.steps} steps, {rep.requests_finished} requests finished "
        f"({rep.unfinished} unfinished), {rep.span_s:.4g} s simulated in {rep.wall_s:.3g} s "
        f"({rep.speed:.0f}x real time)",
        f"throughput {rep.throughput_tok_s:.5g} tok/s, {rep.throughput_per_instance:.5g} per instance",
        f"idle: attention {rep.attention_idle:.3f}, FFN {'-' if rep.ffn_idle is None else f'{rep.ffn_idle:.3f}'}",
        f"TTFT {lat(rep.ttft_ms)}",
        f"TPOT {lat(rep.tpot_ms)}",
        f"ITL  {lat(rep.itl_ms)}",
    ]
    if rep.slo_attainment is not None:
        lines.append(
            f"SLO attainment {rep.slo_attainment:.3f}, goodput {rep.goodput_tok_s:.5g} tok/s"
        )
    return "\n".join(lines)


# ---- profile ----------------------------------------------------------------------------------


def _add_profile(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="time the runtime's attention, FFN, step and transports; fit cost coefficients",
        description=(
            "Time the runtime's own attention sub-block (decode over batch x context, prefill "
            "chunks), FFN sub-block over token counts, engine step and transports; fit the "
            "affine coefficients by least squares and write the profile JSON that "
            "`afdserve plan --profile` and the simulator read."
        ),
    )
    p.add_argument("--model", required=True, help="model directory or builtin:NAME")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--out", required=True, metavar="FILE", help="profile JSON to write")
    p.add_argument(
        "--grid", choices=("default", "small"), default="default", help="measurement grid"
    )
    p.add_argument("--repeats", type=int, help="timed repeats per point (median)")
    p.add_argument(
        "--transports", default="local,copy,shm,tcp", help="transports to time (local,copy,shm,tcp)"
    )
    p.add_argument(
        "--comm-from", default="local", help="transport whose fit becomes `comm` (local)"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--no-worker-steps",
        action="store_true",
        help="do not time worker-process engines over shm/tcp (their `afd_alpha`, `afd_beta`)",
    )
    p.add_argument(
        "--pin-workers", action="store_true", help="pin the timed worker processes to cores"
    )
    p.add_argument("--json", action="store_true", help="print the profile JSON too")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_profile_cli)
    one_line_errors(p)


def run_profile_cli(args: argparse.Namespace) -> int:
    import dataclasses

    from afdserve.calibration.profile import SMALL_GRID, ProfileGrid, check_profile, run_profile

    grid = SMALL_GRID if args.grid == "small" else ProfileGrid()
    if args.repeats is not None:
        if args.repeats < 1:
            raise UserInputError(f"--repeats must be >= 1, got {args.repeats}")
        grid = dataclasses.replace(grid, repeats=args.repeats)
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise UserInputError(f"--out: directory {str(out.parent)!r} does not exist")
    note = (lambda s: print(f"profiling {s} ...", file=sys.stderr)) if not args.quiet else None
    data = run_profile(
        args.model,
        device=args.device,
        dtype=args.dtype,
        grid=grid,
        transports=transports,
        comm_from=args.comm_from,
        threads=args.threads,
        worker_steps=not args.no_worker_steps,
        pin_workers=args.pin_workers,
        progress=note,
    )
    check_profile(data)
    try:
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserInputError(f"cannot write {out}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_render_profile(data, out))
    return 0


def _render_profile(d: dict[str, Any], out: Path) -> str:
    lines = [
        f"{d['model']} on {d['device']}, {d['num_layers']} layers, {d['dtype']}: "
        f"profiled in {d['wall_s']:.1f} s -> {out}",
        f"{'stage':<22} {'alpha':>12} {'beta (ms)':>12} {'R^2':>7} {'max rel err':>11}",
    ]
    for key, label in (
        ("attention", "attention (ms/ctx tok)"),
        ("ffn", "ffn (ms/token)"),
        ("comm", "comm (ms/token)"),
        ("step", "step (ms/sequence)"),
    ):
        e = d[key]
        lines.append(
            f"{label:<22} {e['alpha']:>12.4e} {e['beta']:>12.4e} {e.get('r2', float('nan')):>7.3f} "
            f"{e.get('max_rel_err', float('nan')):>11.3f}"
        )
    pre = d["prefill"]
    lines.append(
        f"prefill: {pre['token_ms']:.4e} ms/token + {pre['pair_ms']:.4e} ms/pair "
        f"(R^2 {pre['r2']:.3f}, max rel err {pre['max_rel_err']:.3f}); AFD step extra "
        f"{d['step'].get('afd_beta', 0.0):.4g} ms"
    )
    for w in d.get("warnings", []):
        lines.append(f"warning: {w}")
    for name, t in d["transport"].items():
        if "alpha" in t:
            lines.append(f"transport {name:<6} {t['alpha']:.4e} ms/token + {t['beta']:.4e} ms")
            if "afd_beta" in t:
                lines.append(
                    f"  worker-process AFD step extra over {name}: {t['afd_alpha']:.4g} ms/sequence"
                    f" + {t['afd_beta']:.4g} ms"
                )
            elif "worker_step_skipped" in t:
                lines.append(f"  worker-process steps skipped: {t['worker_step_skipped']}")
        else:
            lines.append(f"transport {name:<6} skipped: {t['skipped']}")
    return "\n".join(lines)


# ---- sim-validate -----------------------------------------------------------------------------


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim-validate",
        help="validate the simulator against the theory or the real runtime",
        description="theory: simulated optimal r vs the planner's; runtime: sim vs real runs.",
    )
    sub = p.add_subparsers(dest="target", metavar="theory|runtime")
    t = sub.add_parser("theory", help="simulated optimal r vs closed-form and barrier-aware r")
    t.add_argument("--steps", type=int, default=4000, help="steps per simulation (4000)")
    t.add_argument("--quick", action="store_true", help="few steps (a CI-sized run)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true")
    t.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_validate_theory, verb="sim-validate theory")
    one_line_errors(t)
    r = sub.add_parser("runtime", help="simulated vs real step time and tokens/s (in-process)")
    r.add_argument("--model", default="builtin:tiny-llama")
    r.add_argument("--device", default="cpu")
    r.add_argument("--profile", metavar="FILE", help="use this profile instead of measuring one")
    r.add_argument("--grid", choices=("default", "small"), default="default")
    r.add_argument("--requests", type=int, default=16)
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--output-len", type=int, default=64)
    r.add_argument("--repeats", type=int, default=3, help="timed real runs per shape (fastest)")
    r.add_argument("--rounds", type=int, default=1, help="passes through all runs, fastest kept")
    r.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    r.add_argument(
        "--transport",
        default="local",
        help="AFD transport: local (threads) or shm/tcp (worker processes)",
    )
    r.add_argument(
        "--pin-workers", action="store_true", help="pin worker processes to cores (shm/tcp)"
    )
    r.add_argument(
        "--interleave",
        action="store_true",
        help="re-time the worker-process extras right before each round's runs (shm/tcp)",
    )
    r.add_argument("--json", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=run_validate_runtime, verb="sim-validate runtime")
    one_line_errors(r)

    def no_target(_args: argparse.Namespace) -> int:
        raise UserInputError("say what to validate: sim-validate theory or sim-validate runtime")

    p.set_defaults(func=no_target)
    one_line_errors(p)


def run_validate_theory(args: argparse.Namespace) -> int:
    from afdserve.sim.validate_theory import (
        default_coefficient_sets,
        default_workloads,
        validate_theory,
    )

    steps = 400 if args.quick else args.steps
    if steps < 50:
        raise UserInputError(f"--steps must be >= 50, got {steps}")
    sets, loads = default_coefficient_sets(), default_workloads()
    bar = _progress(len(sets) * len(loads), "cases", args.quiet)
    try:
        v = validate_theory(sets, loads, steps=steps, seed=args.seed, progress=bar.update)
    finally:
        bar.close()
    if args.plot:
        _theory_plots(v, Path(args.plot))
    if args.json:
        print(json.dumps(v.to_dict(), indent=2, default=_json_default))
        return 0
    lines = [
        f"{'coefficients':<28} {'workload':<19} {'r*':>7} {'r_cf':>4} {'r_bar':>5} {'r_sim':>5} "
        f"{'gap_cf':>7} {'gap_bar':>7}"
    ]
    for c in v.cases:
        gb = "-" if c.gap_barrier is None else f"{c.gap_barrier:.3f}"
        rb = "-" if c.r_barrier is None else str(c.r_barrier)
        lines.append(
            f"{c.coefficients:<28} {c.workload:<19} {c.r_star:>7.2f} {c.r_closed_form:>4d} "
            f"{rb:>5} {c.r_sim:>5d} {c.gap_closed_form:>7.3f} {gb:>7}"
        )
    s = v.summary()
    for which in ("closed_form", "barrier"):
        if which in s:
            g = s[which]
            lines.append(
                f"{which}: gap median {g['median']:.3f}, p90 {g['p90']:.3f}, max {g['max']:.3f}; "
                f"within 5%: {g['within_5pct']:.0%}, within 10%: {g['within_10pct']:.0%}, "
                f"same r: {g['exact_r']:.0%} ({g['n']} cases, {v.steps} steps a run)"
            )
    print("\n".join(lines))
    return 0


def _theory_plots(v: Any, out: Path) -> None:
    from afdserve.sim.plots import plot_gap_histogram, plot_theory_grid

    out.mkdir(parents=True, exist_ok=True)
    plot_gap_histogram(
        {"closed form": v.gaps("closed_form"), "barrier-aware": v.gaps("barrier")},
        out / "theory_gaps.png",
        title=f"theory vs simulation, {len(v.cases)} cases ({v.steps} steps a run)",
    )
    by_set: dict[str, list[Any]] = {}
    for c in v.cases:
        by_set.setdefault(c.coefficients, []).append(c)
    for name, cases in by_set.items():
        fname = "sweep_" + name.replace("/", "_").replace("+", "_") + ".png"
        plot_theory_grid(
            cases,
            out / fname,
            title=f"{name} (B = {cases[0].batch}): simulated vs closed-form throughput per "
            "instance; lines: r closed form (orange), barrier-aware (green), simulated (blue)",
        )


def run_validate_runtime(args: argparse.Namespace) -> int:
    from afdserve.calibration.profile import SMALL_GRID, ProfileGrid
    from afdserve.calibration.validate_runtime import (
        DEFAULT_RUNS,
        RuntimeRun,
        Workload,
        validate_runtime,
    )

    runs = tuple(
        RuntimeRun(r.mode, r.microbatches, transport=args.transport if r.mode == "afd" else "local")
        for r in DEFAULT_RUNS
    )
    workload = Workload(args.requests, args.prompt_len, args.output_len)
    if args.repeats < 1:
        raise UserInputError(f"--repeats must be >= 1, got {args.repeats}")
    profile = None
    if args.profile:
        try:
            profile = json.loads(Path(args.profile).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{args.profile}: cannot read profile ({exc})") from None
    note = (lambda s: print(f"{s} ...", file=sys.stderr)) if not args.quiet else None
    v = validate_runtime(
        args.model,
        device=args.device,
        profile=profile,
        profile_grid=SMALL_GRID if args.grid == "small" else ProfileGrid(),
        profile_rounds=args.rounds,
        runs=runs,
        workload=workload,
        threads=args.threads,
        repeats=args.repeats,
        rounds=args.rounds,
        pin_workers=args.pin_workers,
        interleave=args.interleave,
        progress=note,
    )
    if args.json:
        print(json.dumps(v.to_dict(), indent=2, default=_json_default))
        return 0
    lines = [
        f"{v.model} on {v.device}: {workload.requests} requests x (prompt {workload.prompt_len}, "
        f"output {workload.output_len})",
        f"{'run':<26} {'real ms/step':>12} {'sim ms/step':>11} {'error':>7} {'real tok/s':>10} "
        f"{'sim tok/s':>9} {'error':>7} {'load':>5} {'serial ms':>9} {'error':>7}",
    ]
    for r in v.runs:
        lines.append(
            f"{r.run:<26} {r.real_step_ms:>12.3f} {r.sim_step_ms:>11.3f} {r.step_ms_error:>+7.1%} "
            f"{r.real_tokens_per_s:>10.0f} {r.sim_tokens_per_s:>9.0f} {r.tokens_per_s_error:>+7.1%} "
            f"{r.load_average:>5.2f} "
            + (
                f"{r.sim_serial_step_ms:>9.3f} {r.serial_step_ms_error:>+7.1%}"
                if r.sim_serial_step_ms is not None
                else f"{'-':>9} {'-':>7}"
            )
        )
    print("\n".join(lines))
    return 0


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
