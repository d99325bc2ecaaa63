"""`afdserve simulate`, `afdserve profile` and `afdserve sim-validate theory|runtime`: the flags,
their checks, and which library function each verb calls; what the verbs compute and print lives
in the modules they call (`search`, `bundle`, `validate_theory`, `render`, the plots, and
`afdserve.calibration` for the two that measure the runtime).

Importing the simulator's package loads numpy; torch loads only inside `profile` and
`sim-validate runtime`, matplotlib only with `--plot`. Bad input raises UserInputError, which
`afdserve.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from afdserve.cli import one_line_errors
from afdserve.errors import UserInputError
from afdserve.planner.cli import add_expert_parallel_flags
from afdserve.planner.render import json_default
from afdserve.sim.render import (
    render_profile,
    render_report,
    render_runtime,
    render_search,
    render_theory,
)


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
    p.add_argument(
        "--weight-dtype",
        choices=("bf16", "fp16", "fp8", "fp32"),
        help="weights' dtype (default: the checkpoint's, from the catalog or config.json)",
    )
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
    p.add_argument(
        "--attention-devices",
        type=int,
        help="with --ratio and --model: devices of each attention instance (default: the "
        "fewest whose memory holds its weights and the KV of --batch slots; printed)",
    )
    p.add_argument(
        "--ffn-devices",
        type=int,
        help="with --ratio and --model: devices of the FFN instance (default: the fewest whose "
        "memory holds it; printed)",
    )
    p.add_argument(
        "--kv-dtype",
        choices=("bf16", "fp16", "fp8", "int8", "fp32"),
        help="KV-cache dtype (default bf16): of the bundle with --ratio and --model (printed "
        "when not given), of every instance in the search",
    )
    p.add_argument(
        "--link",
        choices=("scale-up", "scale-out"),
        help="with --ratio and --model: the A<->F link (default: scale-up when the bundle fits "
        "in one scale-up domain of the hardware, else scale-out; printed)",
    )
    p.add_argument(
        "--prefix-hit-rate",
        metavar="H|trace",
        help="prompt tokens a prefix cache already holds: a share H in [0, 1) of every prompt, "
        "or 'trace' to read them from the trace's hash_ids (Mooncake); prefill computes only "
        "the rest (default: none cached)",
    )
    add_expert_parallel_flags(p)
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
    for flag in ("attention_devices", "ffn_devices", "link"):
        if getattr(args, flag) is not None:
            raise UserInputError(
                f"--{flag.replace('_', '-')} goes with --ratio (the search sizes every instance)"
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
            expert_imbalance=args.expert_imbalance,
            redundant_experts=args.redundant_experts,
            weight_dtype=args.weight_dtype,
            prefix_hit_rate=args.prefix_hit_rate,
            kv_dtype=args.kv_dtype or "bf16",
        )
    finally:
        for b in bars.values():
            b.close()
    if args.plot:
        from afdserve.sim.search_plots import plot_search

        plot_search(result, Path(args.plot), args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=json_default))
    else:
        print(render_search(result))
    return 0


def _simulate_one(args: argparse.Namespace, slo: Any) -> int:
    from afdserve.planner import load_trace
    from afdserve.sim.bundle import bundle_config, plot_bundle, simulate_bundle
    from afdserve.sim.costs import SimCosts

    if args.ratio < 1 or args.batch < 1:
        raise UserInputError("--ratio and --batch must be >= 1")
    M = args.microbatches[0] if len(args.microbatches) == 1 else 1
    ep_summary = None
    assumed: dict[str, Any] = {}
    if args.profile:
        if args.model or args.hardware:
            raise UserInputError("give stage costs one way: --profile, or --model with --hardware")
        for flag, default in (
            ("attention_devices", None),
            ("ffn_devices", None),
            ("kv_dtype", None),
            ("link", None),
            ("expert_imbalance", 1.0),
            ("redundant_experts", 0),
        ):
            if getattr(args, flag) != default:
                raise UserInputError(
                    f"--{flag.replace('_', '-')} goes with --model (a profile has its own costs)"
                )
        costs = SimCosts.from_profile(args.profile, ratio=args.ratio)
    elif args.model and args.hardware:
        costs, ep_summary, assumed = _bundle_costs(args)
    else:
        raise UserInputError("--ratio needs stage costs: --profile FILE, or --model and --hardware")
    trace = load_trace(args.workload)
    cfg = bundle_config(args.ratio, args.batch, M, args.token_budget, saturated=args.closed_loop)
    if not args.closed_loop:
        if args.arrivals == "trace" and trace.arrival_s is None:
            raise UserInputError(
                f"trace {trace.name!r} has no timestamps: use --arrivals poisson --rate R"
            )
        if args.arrivals != "trace" and args.rate is None:
            raise UserInputError(f"--arrivals {args.arrivals} needs --rate (requests/s)")
    from afdserve.planner.prefix import hit_rate
    from afdserve.sim.search import trace_cached

    cached = trace_cached(trace, args.prefix_hit_rate)
    if cached is not None:
        if args.closed_loop:
            raise UserInputError(
                "--prefix-hit-rate goes with open-loop runs (a closed loop has no prefill)"
            )
        prefix = hit_rate(cached, trace.prompt_len)
        print(
            f"prefix cache: {prefix:.3f} of the trace's prompt tokens cached "
            f"({args.prefix_hit_rate}); prefill computes the rest",
            file=sys.stderr,
        )
    sim = simulate_bundle(
        costs,
        trace,
        cfg,
        requests=args.requests,
        saturated=args.closed_loop,
        arrivals=args.arrivals,
        rate=args.rate,
        cv=args.cv,
        seed=args.seed,
        slo=slo,
        engine=args.engine,
        cached=cached,
    )
    if args.plot:
        plot_bundle(sim, Path(args.plot), slo=slo, seed=args.seed)
    if len(args.microbatches) != 1:
        assumed["microbatches"] = f"{M} (give one --microbatches M)"
    for key, what in assumed.items():
        print(f"assumed: {key} = {what}", file=sys.stderr)
    if args.json:
        out = sim.report.to_dict()
        if ep_summary is not None:
            out["expert_parallel"] = ep_summary
        out["assumed"] = assumed
        if cached is not None:
            out["prefix_hit_rate"] = prefix
        print(json.dumps(out, indent=2, default=json_default))
    else:
        if ep_summary is not None:
            from afdserve.planner.render import render_expert_parallel

            print(render_expert_parallel(ep_summary))
        print(render_report(sim.report))
    return 0


def _bundle_costs(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Roofline costs of the one bundle `--ratio` simulates, with every choice the flags left
    open made visibly: devices per side (sized by memory when not given), KV dtype, link. The
    bundle must fit: attention weights + the KV of B slots at the trace's theta on each
    attention instance, every FFN weight + the activations of r*B tokens on the FFN instance.
    Returns (costs, expert-parallel summary, what was assumed)."""
    from afdserve.planner import RooflineSetup, load_hardware, load_model, load_trace
    from afdserve.planner.deployment import expert_parallel_summary, roofline_deployment
    from afdserve.planner.feasibility import memory_report
    from afdserve.planner.stats import stats_from_trace
    from afdserve.sim.costs import roofline_sim_costs

    for flag in ("attention_devices", "ffn_devices"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserInputError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    hw = load_hardware(args.hardware)
    spec = load_model(args.model, args.weight_dtype)
    theta = stats_from_trace(load_trace(args.workload)).theta
    assumed: dict[str, Any] = {}
    kv = args.kv_dtype or "bf16"
    if args.kv_dtype is None:
        assumed["kv_dtype"] = "bf16 (give --kv-dtype)"
    base = RooflineSetup(
        batch=args.batch,
        kv_dtype=kv,
        expert_imbalance=args.expert_imbalance,
        redundant_experts=args.redundant_experts,
    )
    dep = roofline_deployment(
        spec,
        hw,
        hw,
        base,
        theta,
        attention_devices=args.attention_devices,
        ffn_devices=args.ffn_devices,
    )
    g_a, g_f = dep.setup.attention_devices, dep.setup.ffn_devices
    if args.attention_devices is None:
        assumed["attention_devices"] = (
            f"{g_a} per instance (sized by memory; give --attention-devices)"
        )
    if args.ffn_devices is None:
        assumed["ffn_devices"] = f"{g_f} (sized by memory; give --ffn-devices)"
    devices = args.ratio * g_a + g_f
    link = args.link or hw.link_for(devices)
    if args.link is None:
        assumed["link"] = (
            f"{link} ({devices} devices, scale-up domain {hw.scale_up_domain or 'unknown'}; "
            "give --link)"
        )
    from afdserve.planner.roofline import busiest_side

    side = busiest_side(args.ratio, g_a, g_f)
    assumed["comm_scales_with"] = (
        f"{side} (the busier side's links: B per attention instance over {g_a} device(s), or "
        f"r*B over the FFN's {g_f})"
    )
    setup = dataclasses.replace(dep.setup, link=link, comm_scales_with=side)
    mem = memory_report(dep.memory, args.batch, theta, args.ratio)
    if not (mem.attention_ok and mem.ffn_ok):
        side = "attention instance" if not mem.attention_ok else "FFN instance"
        need = mem.attention_bytes if not mem.attention_ok else mem.ffn_bytes
        cap = mem.attention_capacity_bytes if not mem.attention_ok else mem.ffn_capacity_bytes
        raise UserInputError(
            f"the {side} does not fit: it needs {need / 1e9:.1f} GB of {cap / 1e9:.1f} GB usable "
            f"({g_a} attention / {g_f} FFN device(s) of {hw.name}, B = {args.batch} at theta = "
            f"{theta:.0f}, KV {kv}); give more devices or a smaller --batch"
        )
    costs = roofline_sim_costs(spec, hw, hw, setup)
    from afdserve.planner.roofline import roofline_costs

    ep = expert_parallel_summary(spec, setup, roofline_costs(spec, hw, hw, setup))
    return costs, ep, assumed


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

    from afdserve.calibration.grid import SMALL_GRID, ProfileGrid
    from afdserve.calibration.profile import check_profile, run_profile

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
        print(render_profile(data, out))
    return 0


# ---- sim-validate -----------------------------------------------------------------------------


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim-validate",
        help="validate the simulator against the theory or the real runtime",
        description="theory: simulated optimal r vs the planner's; runtime: sim vs real runs.",
    )
    sub = p.add_subparsers(dest="target", metavar="theory|runtime|published")
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

    pub = sub.add_parser(
        "published",
        help="predicted vs published AFD deployments (Step-3 Table 8, FastAFD's A:F sweep)",
        description=(
            "Predict published AFD deployments with the catalogs and the documented default "
            "efficiencies and print predicted vs published with the error (data and sources in "
            "afdserve/sim/data/). --flops-eff/--bw-eff/--link-eff/--gemm-latency-us/--moe-flops-eff/"
            "--ffn-combine show how "
            "sensitive the predictions are; the defaults are what the validation quotes."
        ),
    )
    pub.add_argument("--flops-eff", type=float, help="fraction of peak FLOP/s (default 0.6)")
    pub.add_argument("--bw-eff", type=float, help="fraction of memory bandwidth (default 0.9)")
    pub.add_argument("--link-eff", type=float, help="fraction of link bandwidth (default 0.8)")
    pub.add_argument(
        "--gemm-latency-us",
        type=float,
        help="fixed time per FFN GEMM kernel, microseconds (default 4; 0: the plain roofline max)",
    )
    from afdserve.planner.cli import add_ffn_roofline_flags

    add_ffn_roofline_flags(pub, with_defaults=False)  # None: given only in a sensitivity run
    pub.add_argument("--json", action="store_true")
    pub.set_defaults(func=run_validate_published, verb="sim-validate published")
    one_line_errors(pub)

    def no_target(_args: argparse.Namespace) -> int:
        raise UserInputError("say what to validate: sim-validate theory, runtime or published")

    p.set_defaults(func=no_target)
    one_line_errors(p)


def run_validate_published(args: argparse.Namespace) -> int:
    import dataclasses

    from afdserve.planner.roofline import Efficiency
    from afdserve.sim.published import validate_published
    from afdserve.sim.render import render_published

    given = {
        k: v
        for k, v in (
            ("flops", args.flops_eff),
            ("memory_bw", args.bw_eff),
            ("link", args.link_eff),
            (
                "gemm_latency_ms",
                None if args.gemm_latency_us is None else args.gemm_latency_us / 1e3,
            ),
            ("moe_flops", args.moe_flops_eff),
            ("ffn_combine", args.ffn_combine),
        )
        if v is not None
    }
    eff = dataclasses.replace(Efficiency(), **given)
    report = validate_published(eff)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=json_default))
    else:
        print(render_published(report, tuned=bool(given)))
    return 0


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
        from afdserve.sim.plots import plot_theory_validation

        plot_theory_validation(v, Path(args.plot))
    if args.json:
        print(json.dumps(v.to_dict(), indent=2, default=json_default))
    else:
        print(render_theory(v))
    return 0


def run_validate_runtime(args: argparse.Namespace) -> int:
    from afdserve.calibration.grid import SMALL_GRID, ProfileGrid
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
        print(json.dumps(v.to_dict(), indent=2, default=json_default))
    else:
        print(render_runtime(v))
    return 0
