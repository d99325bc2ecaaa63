"""`afdserve plan` (the Attention/FFN ratio) and `afdserve workload` (trace statistics): the
flags, their checks, and the library calls they come down to; what the verbs compute lives in
`plan`, `stats` and `deployment` (a roofline-sized model on hardware), what they print in
`render`.

Importing the planner's package loads numpy; matplotlib loads only for `--plot`. Every bad
input raises UserInputError, which `afdserve.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING, Any

from afdserve.cli import one_line_errors
from afdserve.errors import UserInputError
from afdserve.planner.render import json_default, plan_title, render_plan, render_workload

if TYPE_CHECKING:
    from afdserve.planner.costs import StageCosts
    from afdserve.planner.ratio import CostWeights
    from afdserve.planner.roofline import MemoryModel
    from afdserve.planner.stats import WorkloadStats

EXPLICIT_FLAGS = ("alpha_a", "beta_a", "alpha_f", "beta_f", "alpha_c", "beta_c")
MODEL_FLAGS = (
    "attention_hw",
    "ffn_hw",
    "hw",
    "attention_devices",
    "ffn_devices",
    "weight_dtype",
    "kv_dtype",
    "link",
    "link_gbps",
    "flops_eff",
    "bw_eff",
    "link_eff",
    "link_latency_ms",
    "usable_memory",
    "expert_imbalance",
    "redundant_experts",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_plan(subparsers)
    _add_workload(subparsers)


# ---- parsers ----------------------------------------------------------------------------------


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="optimal Attention/FFN ratio (rA-1F) for a workload",
        description=(
            "Plan how many attention instances (r) should share one FFN instance. Stage costs "
            "come from explicit per-layer coefficients (ms), a measured profile JSON, or a "
            "roofline of a catalog model on catalog hardware. See docs/planner.md."
        ),
    )
    c = p.add_argument_group("stage costs: explicit coefficients (ms, per layer)")
    c.add_argument("--alpha-a", type=float, help="attention ms per resident context token")
    c.add_argument("--beta-a", type=float, help="attention fixed ms")
    c.add_argument("--alpha-f", type=float, help="FFN ms per token of the aggregated batch")
    c.add_argument("--beta-f", type=float, help="FFN fixed ms")
    c.add_argument("--alpha-c", type=float, help="communication ms per token (default 0)")
    c.add_argument("--beta-c", type=float, help="communication fixed ms (default 0)")
    c.add_argument(
        "--num-layers",
        type=int,
        help="layers per step (default 1: coefficients describe a whole step)",
    )
    c.add_argument(
        "--comm-scales-with",
        choices=("B", "rB", "both"),
        help=(
            "communication affine in B (each attention link; the default for explicit "
            "coefficients) or in r*B (the FFN's link); with --model also 'both' (the default: "
            "each side's links priced, the busier one sets the pace at every r)"
        ),
    )
    pr = p.add_argument_group("stage costs: measured profile")
    pr.add_argument("--profile", metavar="FILE", help="profile JSON written by `afdserve profile`")
    m = p.add_argument_group("stage costs: roofline of a model on hardware")
    m.add_argument("--model", help="catalog model name or a local HF config.json / directory")
    m.add_argument("--hw", help="hardware for both sides")
    m.add_argument("--attention-hw", help="hardware of the attention instances")
    m.add_argument("--ffn-hw", help="hardware of the FFN instance")
    m.add_argument(
        "--attention-devices",
        type=int,
        help="devices per attention instance "
        "(default: the fewest, in powers of two, whose memory holds it)",
    )
    m.add_argument("--ffn-devices", type=int, help="devices per FFN instance (default: as above)")
    m.add_argument(
        "--weight-dtype",
        choices=("bf16", "fp16", "fp8", "fp32"),
        help="weight dtype (default: the checkpoint's)",
    )
    m.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp8", "int8", "fp32"), default="bf16")
    m.add_argument(
        "--link",
        choices=("scale-out", "scale-up"),
        default="scale-out",
        help="link between the two sides (default scale-out: NIC per device)",
    )
    m.add_argument("--link-gbps", type=float, help="override: link Gbit/s per device per direction")
    m.add_argument("--flops-eff", type=float, default=0.6, help="fraction of peak FLOP/s (0.6)")
    m.add_argument("--bw-eff", type=float, default=0.9, help="fraction of memory bandwidth (0.9)")
    m.add_argument("--link-eff", type=float, default=0.8, help="fraction of link bandwidth (0.8)")
    m.add_argument("--link-latency-ms", type=float, default=0.01, help="beta_C, ms (0.01)")
    add_ffn_roofline_flags(m, with_defaults=True)
    m.add_argument(
        "--usable-memory", type=float, default=0.9, help="fraction of device memory usable (0.9)"
    )
    add_expert_parallel_flags(m)
    w = p.add_argument_group("workload (one of)")
    w.add_argument("--theta", type=float, help="step-weighted context tokens per slot")
    w.add_argument("--sigma2", type=float, help="per-slot context variance (with --theta)")
    w.add_argument(
        "--workload",
        metavar="NAME_OR_FILE",
        help="azure-conv, azure-code, mooncake(-conv), mooncake-synthetic or a trace file",
    )
    w.add_argument("--prompt", metavar="DIST", help="prompt length distribution, e.g. fixed:1000")
    w.add_argument(
        "--output", metavar="DIST", help="output length distribution, e.g. geometric:0.002"
    )
    p.add_argument("--batch", type=int, required=True, help="decode slots B per attention instance")
    p.add_argument("--tpot-slo-ms", type=float, help="TPOT SLO: num_layers * tau must fit it")
    p.add_argument("--attention-price", type=float, help="$/h of one attention instance")
    p.add_argument("--ffn-price", type=float, help="$/h of one FFN instance")
    p.add_argument("--r-max", type=int, help="largest r in the table")
    p.add_argument(
        "--microbatches",
        type=int,
        help="time every r as M ping-pong microbatches, each paying the fixed costs (the FFN's "
        "weight read once per microbatch, as `afdserve simulate` does); default with --model: "
        "2, the fewest that overlap; without --model: the ideal model (fixed costs once a layer)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="plot throughput and idle fractions vs r")
    p.set_defaults(func=run_plan)
    one_line_errors(p)


def _add_workload(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "workload",
        help="theta and sigma_X^2 of traces or length distributions",
        description=(
            "Print the step-weighted context per slot (theta) and its variance for traces "
            "(default: every trace in the shared traces directory) or for a pair of length "
            "distributions."
        ),
    )
    p.add_argument("traces", nargs="*", metavar="NAME_OR_FILE", help="named workloads or files")
    p.add_argument("--prompt", metavar="DIST", help="prompt length distribution")
    p.add_argument("--output", metavar="DIST", help="output length distribution")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run_workload)
    one_line_errors(p)


# ---- plan -------------------------------------------------------------------------------------


def run_plan(args: argparse.Namespace) -> int:
    from afdserve.planner.plan import plan

    if args.batch < 1:
        raise UserInputError(f"--batch must be >= 1, got {args.batch}")
    if args.r_max is not None and args.r_max < 1:
        raise UserInputError(f"--r-max must be >= 1, got {args.r_max}")
    if args.tpot_slo_ms is not None and not (
        math.isfinite(args.tpot_slo_ms) and args.tpot_slo_ms > 0
    ):
        raise UserInputError(f"--tpot-slo-ms must be > 0, got {args.tpot_slo_ms}")
    _check_sources(args)
    stats = _workload_stats(args)
    extra: dict[str, Any] = {}
    memory: MemoryModel | None = None
    if args.model:
        costs, memory, weights, extra = _roofline(args, stats)
    else:
        costs = _profile_costs(args) if args.profile else _explicit_costs(args)
        weights = _explicit_weights(args)
    microbatches = args.microbatches
    if microbatches is not None and microbatches < 1:
        raise UserInputError(f"--microbatches must be >= 1, got {microbatches}")
    if microbatches is None and args.model:
        microbatches = 2
    result = plan(
        costs,
        args.batch,
        stats,
        weights=weights,
        tpot_slo_ms=args.tpot_slo_ms,
        memory=memory,
        r_max=args.r_max,
        microbatches=microbatches,
    )
    if args.plot:
        from afdserve.planner.plot import plot_plan

        plot_plan(result, args.plot, title=plan_title(result, extra))
    if args.json:
        out = result.to_dict()
        out.update(extra)
        print(json.dumps(out, indent=2, default=json_default))
    else:
        print(render_plan(result, extra))
    return 0


def _check_sources(args: argparse.Namespace) -> None:
    explicit = [f for f in EXPLICIT_FLAGS if getattr(args, f) is not None]
    sources = [
        name
        for name, used in (
            ("explicit coefficients", explicit or args.num_layers),
            ("--profile", args.profile),
            ("--model", args.model),
        )
        if used
    ]
    if len(sources) != 1:
        raise UserInputError(
            "give stage costs one way: --alpha-a/--beta-a/--alpha-f/--beta-f[/--alpha-c/--beta-c], "
            f"--profile FILE, or --model with hardware (got {', '.join(sources) or 'none'})"
        )
    if not args.model:
        given = [f for f in MODEL_FLAGS if _given(args, f)]
        if given:
            raise UserInputError(f"--{given[0].replace('_', '-')} only applies with --model")
    for f in EXPLICIT_FLAGS:
        v = getattr(args, f)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UserInputError(f"--{f.replace('_', '-')} must be a number >= 0, got {v}")
    if explicit:
        missing = [f for f in EXPLICIT_FLAGS[:4] if getattr(args, f) is None]
        if missing:
            raise UserInputError(
                "explicit coefficients need "
                + ", ".join("--" + f.replace("_", "-") for f in missing)
            )
    if args.num_layers is not None and args.num_layers < 1:
        raise UserInputError(f"--num-layers must be >= 1, got {args.num_layers}")


_MODEL_DEFAULTS = {
    "kv_dtype": "bf16",
    "link": "scale-out",
    "flops_eff": 0.6,
    "bw_eff": 0.9,
    "link_eff": 0.8,
    "link_latency_ms": 0.01,
    "usable_memory": 0.9,
    "expert_imbalance": 1.0,
    "redundant_experts": 0,
}


def add_expert_parallel_flags(group: Any) -> None:
    """`--expert-imbalance` and `--redundant-experts` (MoE models; `plan` and `simulate`)."""
    group.add_argument(
        "--expert-imbalance",
        type=float,
        default=1.0,
        help="MoE: max/mean routed load over the FFN devices, scaling the routed experts' "
        "compute (1.0 = balanced; the runtime's afdserve:ffn_expert_imbalance, mean over layers)",
    )
    group.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="MoE: extra expert slots per layer (EPLB replicas); their weights are held and "
        "streamed by the FFN devices (0)",
    )


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag)
    return value is not None and value != _MODEL_DEFAULTS.get(flag)


def _workload_stats(args: argparse.Namespace) -> WorkloadStats:
    from afdserve.planner.distributions import parse_distribution
    from afdserve.planner.stats import WorkloadStats, stats_from_distributions, stats_from_trace
    from afdserve.planner.workload import load_trace

    dist = args.prompt is not None or args.output is not None
    chosen = [
        n
        for n, used in (
            ("--theta", args.theta is not None),
            ("--workload", args.workload),
            ("--prompt/--output", dist),
        )
        if used
    ]
    if len(chosen) != 1:
        raise UserInputError(
            "give the workload one way: --theta T [--sigma2 S], --workload NAME_OR_FILE, or "
            f"--prompt DIST --output DIST (got {', '.join(chosen) or 'none'})"
        )
    if args.sigma2 is not None and args.theta is None:
        raise UserInputError("--sigma2 goes with --theta (traces and distributions give their own)")
    if args.theta is not None:
        for flag, v in (("--theta", args.theta), ("--sigma2", args.sigma2)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise UserInputError(f"{flag} must be a number >= 0, got {v}")
        return WorkloadStats(theta=args.theta, sigma2=args.sigma2, source="explicit")
    if args.workload:
        return stats_from_trace(load_trace(args.workload))
    if args.prompt is None or args.output is None:
        raise UserInputError("--prompt and --output go together")
    return stats_from_distributions(
        parse_distribution(args.prompt), parse_distribution(args.output)
    )


def _explicit_costs(args: argparse.Namespace) -> StageCosts:
    from afdserve.planner.costs import StageCosts

    _single_link(args, "explicit coefficients")
    return StageCosts.explicit(
        args.alpha_a,
        args.beta_a,
        args.alpha_f,
        args.beta_f,
        args.alpha_c or 0.0,
        args.beta_c or 0.0,
        comm_scales_with=args.comm_scales_with or "B",
        num_layers=args.num_layers or 1,
    )


def _profile_costs(args: argparse.Namespace) -> StageCosts:
    import dataclasses

    from afdserve.planner.costs import StageCosts

    _single_link(args, "a profile")
    costs = StageCosts.from_profile(args.profile)
    if args.comm_scales_with:
        costs = dataclasses.replace(costs, comm_scales_with=args.comm_scales_with)
    return costs


def add_ffn_roofline_flags(parser: Any, with_defaults: bool) -> None:
    """The roofline FFN's two assumptions as flags (`Efficiency.moe_flops`, `.ffn_combine`) of
    `plan --model` (`with_defaults`: the documented defaults) and `sim-validate published`
    (None when not given: a sensitivity run names what it changes; docs/simulator.md 5)."""
    from afdserve.planner.roofline import Efficiency

    moe_default = Efficiency().moe_flops if with_defaults else None
    parser.add_argument(
        "--moe-flops-eff",
        type=float,
        default=moe_default,
        help="fraction of peak FLOP/s each token of an MoE FFN costs on top of its weight "
        f"streaming (default {Efficiency().moe_flops}, from aiconfigurator's MoE kernel tables)",
    )
    parser.add_argument(
        "--ffn-combine",
        choices=("max", "sum"),
        default=None,
        help="FFN roofline: max (compute overlaps weight streaming) or sum (default: sum for an "
        "MoE FFN, max for a dense one)",
    )


def _single_link(args: argparse.Namespace, source: str) -> None:
    if args.comm_scales_with == "both":
        raise UserInputError(
            f"--comm-scales-with both prices each side's links from the roofline (--model); "
            f"{source} give one link: B or rB"
        )


def _explicit_weights(args: argparse.Namespace) -> CostWeights:
    from afdserve.planner.ratio import CostWeights

    prices = (args.attention_price, args.ffn_price)
    if prices == (None, None):
        return CostWeights()
    if None in prices:
        raise UserInputError("--attention-price and --ffn-price go together")
    _check_prices(args)
    return CostWeights(args.attention_price, args.ffn_price, "$/h")


def _check_prices(args: argparse.Namespace) -> None:
    for flag, v in (("--attention-price", args.attention_price), ("--ffn-price", args.ffn_price)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserInputError(f"{flag} must be > 0 ($/h), got {v}")


def _roofline(
    args: argparse.Namespace, stats: WorkloadStats
) -> tuple[StageCosts, MemoryModel, CostWeights, dict[str, Any]]:
    from afdserve.planner.deployment import roofline_deployment
    from afdserve.planner.hardware_catalog import load_hardware
    from afdserve.planner.model_catalog import load_model
    from afdserve.planner.ratio import CostWeights
    from afdserve.planner.roofline import Efficiency, RooflineSetup

    if args.hw and (args.attention_hw or args.ffn_hw):
        raise UserInputError("give --hw, or --attention-hw and --ffn-hw, not both")
    a_name = args.attention_hw or args.hw
    f_name = args.ffn_hw or args.hw
    if not a_name or not f_name:
        raise UserInputError("--model needs hardware: --hw, or --attention-hw and --ffn-hw")
    model = load_model(args.model, args.weight_dtype)
    a_hw, f_hw = load_hardware(a_name), load_hardware(f_name)
    for flag in ("attention_devices", "ffn_devices"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserInputError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.link_gbps is not None and not (math.isfinite(args.link_gbps) and args.link_gbps > 0):
        raise UserInputError(f"--link-gbps must be > 0, got {args.link_gbps}")
    eff = Efficiency(
        flops=args.flops_eff,
        memory_bw=args.bw_eff,
        link=args.link_eff,
        link_latency_ms=args.link_latency_ms,
        usable_memory=args.usable_memory,
        moe_flops=args.moe_flops_eff,
        ffn_combine=args.ffn_combine,
    )
    setup = RooflineSetup(
        batch=args.batch,
        kv_dtype=args.kv_dtype,
        link=args.link,
        link_bw=None if args.link_gbps is None else args.link_gbps * 1e9 / 8,
        comm_scales_with=args.comm_scales_with or "both",
        efficiency=eff,
        expert_imbalance=args.expert_imbalance,
        redundant_experts=args.redundant_experts,
    )
    dep = roofline_deployment(
        model,
        a_hw,
        f_hw,
        setup,
        stats.theta,
        attention_devices=args.attention_devices,
        ffn_devices=args.ffn_devices,
    )
    extra = dep.to_dict()
    _check_prices(args)
    if (args.attention_price is None) != (args.ffn_price is None):
        raise UserInputError("--attention-price and --ffn-price go together")
    if args.attention_price is not None:
        weights = CostWeights(args.attention_price, args.ffn_price, "$/h")
    else:
        weights, note = dep.default_weights()
        if note:
            extra["sizing_notes"].append(note)
    return dep.costs, dep.memory, weights, extra


# ---- workload ---------------------------------------------------------------------------------


def run_workload(args: argparse.Namespace) -> int:
    from afdserve.planner.distributions import parse_distribution
    from afdserve.planner.stats import stats_from_distributions, stats_from_trace
    from afdserve.planner.workload import load_trace, trace_files, traces_dir

    rows = []
    if args.prompt is not None or args.output is not None:
        if args.prompt is None or args.output is None:
            raise UserInputError("--prompt and --output go together")
        if args.traces:
            raise UserInputError("give traces or --prompt/--output, not both")
        stats = stats_from_distributions(
            parse_distribution(args.prompt), parse_distribution(args.output)
        )
        rows.append(stats)
    else:
        names = args.traces or [str(p) for p in trace_files()]
        if not names:
            raise UserInputError(f"no trace files in {traces_dir()}")
        for name in names:
            trace = load_trace(name)
            rows.append(stats_from_trace(trace))
    if args.json:
        print(json.dumps([s.to_dict() for s in rows], indent=2))
    else:
        print(render_workload(rows))
    return 0
