"""The worker-process coefficients of a transport (`afd_alpha`, `afd_beta`,
`afd_prefill_token_ms`, `afd_microbatch_ms`): what worker-process steps cost beyond the
in-process prediction, fitted from `measure_workers`' points; and the simulator's costs for a
run over a transport (`costs_for_transport`), which apply them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.costs import SimCosts
from afdserve.sim.fit import AffineFit


def costs_for_transport(profile: dict[str, Any], transport: str) -> SimCosts:
    """The profile's costs with `comm` taken from the timing of `transport` (each run is
    simulated with the transfer cost of the transport it really used), and for a worker-process
    transport the per-step AFD extra the profile measured over it (`afd_beta`, and `afd_alpha`
    per sequence on top of `step.alpha`), if it did."""
    timed = profile.get("transport", {}).get(transport)
    if transport == profile.get("comm_transport") or not timed or "alpha" not in timed:
        if transport != profile.get("comm_transport", "local"):
            raise UserInputError(f"the profile has no timing of transport {transport!r}")
        return SimCosts.from_profile_dict(profile, origin="profile")
    swapped = {
        **profile,
        "comm": {k: timed[k] for k in ("alpha", "beta", "r2", "max_rel_err") if k in timed},
        "comm_transport": transport,
    }
    if "afd_beta" in timed:
        step = dict(profile.get("step", {}))
        step["afd_beta"] = timed["afd_beta"]
        step["alpha"] = step.get("alpha", 0.0) + timed.get("afd_alpha", 0.0)
        step["prefill_token_ms"] = step.get("prefill_token_ms", 0.0) + timed.get(
            "afd_prefill_token_ms", 0.0
        )
        step["afd_microbatch_ms"] = timed.get("afd_microbatch_ms", 0.0)
        swapped["step"] = step
    return SimCosts.from_profile_dict(swapped, origin="profile")


def worker_extras(
    profile: dict[str, Any], transport: str, pts: list[tuple], pre: list[tuple], pts2: list[tuple]
) -> dict[str, Any]:
    """A transport's worker-process coefficients (`afd_alpha`, `afd_beta`,
    `afd_prefill_token_ms`, `afd_microbatch_ms`) and their points, from worker-process decode
    steps (M = 1), prefill steps and M = 2 decode steps, fitted against the in-process fits in
    `profile` (whose `transport.<name>` must hold that transport's transfer fit)."""

    def fit(d: dict[str, Any]) -> AffineFit:  # only alpha and beta predict
        return AffineFit(float(d["alpha"]), float(d["beta"]), 1.0, 0.0, 0)

    timed, step = profile["transport"][transport], profile["step"]
    L = int(profile["num_layers"])
    attn_fit, ffn_fit, step_fit = fit(profile["attention"]), fit(profile["ffn"]), fit(step)
    alpha, beta = _worker_afd_fit(pts, L, attn_fit, ffn_fit, step_fit, timed)
    per_token = _worker_prefill_fit(
        pre, L, attn_fit, profile["prefill"], ffn_fit, step_fit,
        float(step.get("prefill_token_ms", 0.0)), timed, alpha, beta,
    )  # fmt: skip
    out = {
        "afd_alpha": alpha,
        "afd_beta": beta,
        "afd_prefill_token_ms": per_token,
        "afd_microbatch_ms": 0.0,
        "worker_step_points": [list(q) for q in pts],
        "worker_prefill_points": [list(q) for q in pre],
        "worker_step_points_m2": [list(q) for q in pts2],
    }
    # the M = 2 term is judged against the simulator with the other three in place
    again = {**profile, "transport": {**profile["transport"], transport: {**timed, **out}}}
    out["afd_microbatch_ms"] = _worker_microbatch_fit(pts, pts2, again, transport)
    return out


def _worker_afd_fit(
    pts: list[tuple],
    num_layers: int,
    attn_fit: AffineFit,
    ffn_fit: AffineFit,
    step_fit: AffineFit,
    comm: dict[str, Any],
) -> tuple[float, float]:
    """A transport's (`afd_alpha` per sequence, `afd_beta`): measured worker-process decode
    steps (N, context, ms) minus what the in-process profile predicts for them (layers,
    per-step work, 2 L fitted transfers), fitted as a line in N. Part of the extra grows with
    the batch (every sequence's token event is encoded by the worker and decoded by the front,
    which shares the cores), part does not (control messages, wake-ups). Theil-Sen (median of
    pairwise slopes), so that one disturbed point does not tilt the line; both at least 0."""
    from scipy.stats import theilslopes

    p = np.asarray(pts, dtype=np.float64)
    n, ctx, ms = p[:, 0], p[:, 1], p[:, 2]
    predicted = (
        num_layers * (attn_fit.predict(n * ctx) + ffn_fit.predict(n))
        + step_fit.predict(n)
        + 2 * num_layers * (comm["alpha"] * n + comm["beta"])
    )
    resid = ms - predicted
    slope = max(0.0, float(theilslopes(resid, n)[0])) if len(set(n.tolist())) > 1 else 0.0
    beta = float(np.median(resid - slope * n))
    if beta < 0:  # the line crosses below 0 at small N: keep it through the origin instead
        beta = 0.0
        slope = max(0.0, float(np.median(resid / n)))
    return slope, beta


def _worker_prefill_fit(
    pts: list[tuple],
    num_layers: int,
    attn_fit: AffineFit,
    prefill: dict[str, float],
    ffn_fit: AffineFit,
    step_fit: AffineFit,
    step_prefill_token_ms: float,
    comm: dict[str, Any],
    afd_alpha: float,
    afd_beta: float,
) -> float:
    """A transport's `afd_prefill_token_ms`: measured worker-process prefill steps (S
    sequences, P prompt tokens each, ms) minus the in-process prediction of the same step (the
    prefill fit's attention, the FFN, the per-step and per-prefill-token work, 2 L fitted
    transfers of S P hidden states) and the decode-fitted worker extra (`afd_beta`,
    `afd_alpha` per sequence), per prefill token: the median over the points, at least 0.
    What it catches is what grows with a step's tokens only over worker processes: the hidden
    states of a whole prefill step cross between processes (and caches) every layer."""
    p = np.asarray(pts, dtype=np.float64)
    if not len(p):
        return 0.0
    s, n, ms = p[:, 0], p[:, 1], p[:, 2]
    tokens = s * n
    attention = (
        attn_fit.alpha * tokens
        + attn_fit.beta
        + prefill["token_ms"] * tokens
        + prefill["pair_ms"] * s * n * (n + 1) / 2.0
    )
    predicted = (
        num_layers * (attention + ffn_fit.predict(tokens))
        + step_fit.predict(s)
        + step_prefill_token_ms * tokens
        + 2 * num_layers * (comm["alpha"] * tokens + comm["beta"])
        + afd_alpha * s
        + afd_beta
    )
    return max(0.0, float(np.median((ms - predicted) / tokens)))


def _worker_microbatch_fit(
    pts1: list[tuple], pts2: list[tuple], profile: dict[str, Any], transport: str
) -> float:
    """A transport's `afd_microbatch_ms`: what a second microbatch costs a worker-process
    decode step beyond what the simulator (with this transport's other extras) says it costs,
    the median over N of (measured M=2 - measured M=1) - (simulated M=2 - simulated M=1),
    at least 0. Taken as a difference so that the M = 1 fit's own misses at each N cancel."""
    from afdserve.sim.pipeline import time_one_step

    costs = costs_for_transport(profile, transport)
    extra = []
    for (n, ctx, ms1), (n2, _, ms2) in zip(pts1, pts2, strict=True):
        if n != n2 or n < 2:  # one sequence fills one microbatch only
            continue
        halves = [n // 2 + n % 2, n // 2]
        one = time_one_step(costs, "microbatch", [[n]], [[n * ctx]], [[0]], [[0]], [n])[0]
        two = time_one_step(
            costs, "microbatch", [halves], [[h * ctx for h in halves]], [[0, 0]], [[0, 0]], [n]
        )[0]
        extra.append((ms2 - ms1) - (two - one))
    return max(0.0, float(np.median(extra))) if extra else 0.0
