"""Stage cost models: affine per-layer times of attention, FFN and communication, in milliseconds.

Every coefficient describes ONE transformer layer of ONE decode step (units: ms, tokens):

    t_attention(T) = alpha_A * T + beta_A   T = context tokens resident in one attention instance's
                                            B slots (the KV it reads)
    t_ffn(n)       = alpha_F * n + beta_F   n = tokens in the FFN's aggregated batch (r * B)
    t_comm(n)      = alpha_C * n + beta_C   n = tokens crossing the busiest link one way: B per
                                            attention instance (`comm_scales_with="B"`), or r * B
                                            into the FFN (`comm_scales_with="rB"`)
    t_comm(B, r)   = max(alpha_C B + beta_C, alpha_CF r B + beta_CF)   (`comm_scales_with="both"`:
                                            each side's links with their own coefficients, the
                                            busier one setting the pace; what a search over r
                                            needs, since the busier side changes with r)

A roofline FFN (`Affine(combine="max")`) is t_ffn(n) = max(alpha_F * n, beta_F) instead: the
larger of its compute and its weight streaming, which a GEMM overlaps; a measured profile keeps
the fitted sum.

A decode step runs `num_layers` layers, so with pipelining its time is num_layers * tau with
tau = max(t_attention, t_comm, t_ffn); the TPOT SLO check uses exactly that. Coefficients given
for a whole step instead are the same thing with num_layers = 1 (the CLI's default for explicit
coefficients).

Three sources: explicit numbers (`StageCosts.explicit`), a measured profile JSON
(`StageCosts.from_profile`; the schema is in docs/planner.md and `to_profile_dict` writes it), or a
roofline derivation from a model and hardware (`afdserve.planner.roofline.roofline_costs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afdserve.errors import UserInputError

COMM_SCALINGS: tuple[str, ...] = ("B", "rB", "both")
COMBINES: tuple[str, ...] = ("sum", "max")
PROFILE_UNITS = "ms"


@dataclass(frozen=True)
class Affine:
    """t(x) = alpha * x + beta, in ms (`combine="sum"`, the default: a fitted or explicit line),
    or t(x) = max(alpha * x, beta) + fixed (`combine="max"`: a roofline, where beta is the time
    to stream the weights, alpha * x the compute, which a GEMM overlaps with its loads, and
    `fixed` its kernels' launch and pipeline fill); optional fit quality when it was fitted."""

    alpha: float
    """ms per unit of x (a token, or a resident context token for attention)."""
    beta: float
    """ms at x = 0 (weight streaming, launch and latency costs)."""
    r2: float | None = None
    """Coefficient of determination of the fit, if fitted."""
    max_rel_err: float | None = None
    """Largest |fit - measured| / measured over the fitted points, if fitted."""
    combine: str = "sum"
    """How the two terms combine: 'sum' (alpha * x + beta) or 'max' (max(alpha * x, beta))."""
    fixed: float = 0.0
    """ms added to either form (a roofline's per-kernel latencies; 0 for a fitted line, whose
    beta already holds them)."""

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise UserInputError(
                f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}"
            )
        for name in ("alpha", "beta", "fixed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserInputError(f"{name} must be a finite number, got {v!r}")
            if v < 0:
                raise UserInputError(f"{name} must be >= 0, got {v!r}")
        for name in ("r2", "max_rel_err"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise UserInputError(f"{name} must be a finite number or null, got {v!r}")

    def __call__(self, x: float) -> float:
        if self.combine == "max":
            return max(self.alpha * x, self.beta) + self.fixed
        return self.alpha * x + self.beta + self.fixed

    @property
    def line(self) -> tuple[float, float, float]:
        """(slope, intercept, floor) with t(x) = max(slope * x + intercept, floor): (alpha,
        beta + fixed, 0) for 'sum', (alpha, fixed, beta + fixed) for 'max'; what the
        closed-form ratio works with."""
        if self.combine == "max":
            return self.alpha, self.fixed, self.beta + self.fixed
        return self.alpha, self.beta + self.fixed, 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alpha": self.alpha, "beta": self.beta}
        if self.combine != "sum":
            d["combine"] = self.combine
        if self.fixed:
            d["fixed"] = self.fixed
        if self.r2 is not None:
            d["r2"] = self.r2
        if self.max_rel_err is not None:
            d["max_rel_err"] = self.max_rel_err
        return d


@dataclass(frozen=True)
class StageCosts:
    """Per-layer stage cost coefficients of one rA-1F bundle (see the module docstring)."""

    attention: Affine
    """Per attention instance: alpha_A ms per resident context token, beta_A ms."""
    ffn: Affine
    """Per FFN instance: alpha_F ms per token of the aggregated batch, beta_F ms."""
    comm: Affine
    """alpha_C ms per token sent one way over the busiest link, beta_C ms (latency); with
    `comm_scales_with="both"`, an attention instance's link (B tokens)."""
    comm_scales_with: str = "B"
    """'B': each attention instance's own link carries B tokens; 'rB': the FFN's link carries r*B;
    'both': `comm` prices the attention side's link and `comm_ffn` the FFN side's, and a
    transfer takes the longer of the two (one transfer runs at its slower end's rate)."""
    num_layers: int = 1
    """Layers per decode step; a step takes num_layers * tau."""
    source: str = "explicit"
    """'explicit', 'roofline', 'measured' or another note on where the numbers came from."""
    model: str | None = None
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Extra top-level keys of a profile (kept for round trips; ignored by the planner)."""
    comm_ffn: Affine | None = None
    """With `comm_scales_with="both"` (and only then): the FFN side's link, alpha ms per token of
    the r*B it receives one way, beta ms."""

    def __post_init__(self) -> None:
        for name in ("attention", "ffn", "comm"):
            if not isinstance(getattr(self, name), Affine):
                raise UserInputError(f"{name} costs must be an Affine, got {getattr(self, name)!r}")
        check_comm_scaling(self.comm_scales_with)
        both = self.comm_scales_with == "both"
        if both and not isinstance(self.comm_ffn, Affine):
            raise UserInputError(
                "comm_scales_with 'both' needs the FFN link's costs (comm_ffn: alpha, beta)"
            )
        if not both and self.comm_ffn is not None:
            raise UserInputError(
                f"comm_ffn prices the FFN's link of comm_scales_with 'both', not "
                f"{self.comm_scales_with!r}"
            )
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise UserInputError(f"num_layers must be an integer, got {self.num_layers!r}")
        if self.num_layers < 1:
            raise UserInputError(f"num_layers must be >= 1, got {self.num_layers}")

    # ---- stage times (ms, one layer) -------------------------------------------------------

    def t_attention(self, context_tokens: float) -> float:
        """One attention instance's time for one layer with `context_tokens` resident tokens."""
        return self.attention(context_tokens)

    def t_ffn(self, tokens: float) -> float:
        """The FFN's time for one layer on an aggregated batch of `tokens` tokens."""
        return self.ffn(tokens)

    def t_comm(self, tokens: float) -> float:
        """Time to move `tokens` hidden states one way over the `comm` link (see `t_comm_for`)."""
        return self.comm(tokens)

    def t_comm_for(self, batch: float, r: float) -> float:
        """One-way transfer time of B tokens from each of r attention instances to the FFN: B
        on each attention link, r*B on the FFN's ('both' takes the slower of the two)."""
        if self.comm_scales_with == "both":
            assert self.comm_ffn is not None
            return max(self.comm(batch), self.comm_ffn(batch * r))
        return self.comm(batch * r if self.comm_scales_with == "rB" else batch)

    def at_ratio(self, r: int) -> StageCosts:
        """These costs for a bundle of exactly r attention instances, with one link ('B' or
        'rB') in place of 'both': what the simulator, whose r is fixed, takes. Exact when the two
        links have the same fixed cost (the roofline's: one latency): then the busier link is
        the same at every batch, the one with the larger per-token time at this r."""
        if self.comm_scales_with != "both":
            return self
        assert self.comm_ffn is not None
        a, f = self.comm, self.comm_ffn
        if a.beta + a.fixed != f.beta + f.fixed:
            raise UserInputError(
                "comm_scales_with 'both' with different fixed costs on the two links has no "
                "single-link equivalent; give comm_scales_with 'B' or 'rB'"
            )
        if r * f.alpha > a.alpha:
            return dataclasses.replace(self, comm=f, comm_scales_with="rB", comm_ffn=None)
        return dataclasses.replace(self, comm_scales_with="B", comm_ffn=None)

    def per_layer_loads(self, microbatches: int) -> StageCosts:
        """The coefficients of one layer's total load when it runs as M microbatches.

        Each microbatch pays every fixed cost again: the FFN streams its weights once per
        microbatch (beta_F), attention its projection weights (beta_A), each transfer its
        latency (beta_C). Summed over M microbatches of B/M slots a stage's load is
        alpha * x + M * beta, i.e. these coefficients with every beta times M. This is what the
        simulator and aiconfigurator charge; the planner's old cycle charged one beta per layer.
        A 'max' stage is the same: M * (max(alpha * x / M, beta) + fixed) = max(alpha * x,
        M * beta) + M * fixed.
        """
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise UserInputError(f"microbatches must be an integer >= 1, got {microbatches!r}")
        m = microbatches
        return dataclasses.replace(
            self,
            attention=_times_m(self.attention, m),
            ffn=_times_m(self.ffn, m),
            comm=_times_m(self.comm, m),
            comm_ffn=None if self.comm_ffn is None else _times_m(self.comm_ffn, m),
        )

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def explicit(
        cls,
        alpha_a: float,
        beta_a: float,
        alpha_f: float,
        beta_f: float,
        alpha_c: float = 0.0,
        beta_c: float = 0.0,
        *,
        comm_scales_with: str = "B",
        num_layers: int = 1,
        model: str | None = None,
        device: str | None = None,
    ) -> StageCosts:
        """Coefficients given as numbers (ms, per layer)."""
        return cls(
            attention=_affine("attention", alpha_a, beta_a),
            ffn=_affine("ffn", alpha_f, beta_f),
            comm=_affine("comm", alpha_c, beta_c),
            comm_scales_with=comm_scales_with,
            num_layers=num_layers,
            source="explicit",
            model=model,
            device=device,
        )

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str]) -> StageCosts:
        """Read a profile JSON (schema: docs/planner.md, as written by `afdserve profile`)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{p}: cannot read profile ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_profile_dict(data, origin=str(p))

    @classmethod
    def from_profile_dict(cls, data: Any, origin: str = "profile") -> StageCosts:
        """Build from the parsed profile JSON object; every problem names `origin` and the key."""
        if not isinstance(data, dict):
            raise UserInputError(f"{origin}: a profile must be a JSON object")
        units = data.get("units", PROFILE_UNITS)
        if units != PROFILE_UNITS:
            raise UserInputError(f"{origin}: units must be {PROFILE_UNITS!r}, got {units!r}")
        stages = {
            stage: _stage_affine(data, stage, origin) for stage in ("attention", "ffn", "comm")
        }
        comm_ffn = _stage_affine(data, "comm_ffn", origin) if "comm_ffn" in data else None
        comm_entry = data["comm"]
        num_layers = data.get("num_layers", 1)
        known = {
            *("source", "model", "device", "units", "num_layers"),
            *("attention", "ffn", "comm", "comm_ffn"),
        }
        try:
            return cls(
                attention=stages["attention"],
                ffn=stages["ffn"],
                comm=stages["comm"],
                comm_scales_with=comm_entry.get("scales_with", "B"),
                num_layers=num_layers,
                source=str(data.get("source", "measured")),
                model=_opt_str(data.get("model")),
                device=_opt_str(data.get("device")),
                extra={k: v for k, v in data.items() if k not in known},
                comm_ffn=comm_ffn,
            )
        except UserInputError as exc:
            raise UserInputError(f"{origin}: {exc}") from None

    def to_profile_dict(self) -> dict[str, Any]:
        """The profile JSON object (the inverse of `from_profile_dict`)."""
        comm = self.comm.to_dict()
        comm["scales_with"] = self.comm_scales_with
        return {
            "source": self.source,
            "model": self.model,
            "device": self.device,
            "units": PROFILE_UNITS,
            "num_layers": self.num_layers,
            "attention": self.attention.to_dict(),
            "ffn": self.ffn.to_dict(),
            "comm": comm,
            **({} if self.comm_ffn is None else {"comm_ffn": self.comm_ffn.to_dict()}),
            **self.extra,
        }


def _stage_affine(data: dict[str, Any], stage: str, origin: str) -> Affine:
    """One stage's {alpha, beta, ...} object of a profile."""
    entry = data.get(stage)
    if not isinstance(entry, dict):
        raise UserInputError(f"{origin}: missing object {stage!r} with alpha and beta")
    for key in ("alpha", "beta"):
        if key not in entry:
            raise UserInputError(f"{origin}: {stage}.{key} is missing")
    try:
        return Affine(
            alpha=entry["alpha"],
            beta=entry["beta"],
            r2=entry.get("r2"),
            max_rel_err=entry.get("max_rel_err"),
            combine=entry.get("combine", "sum"),
            fixed=entry.get("fixed", 0.0),
        )
    except UserInputError as exc:
        raise UserInputError(f"{origin}: {stage}: {exc}") from None


def check_comm_scaling(value: Any) -> None:
    """`comm_scales_with` is one of COMM_SCALINGS (StageCosts and RooflineSetup both take it)."""
    if value not in COMM_SCALINGS:
        raise UserInputError(
            f"comm_scales_with must be one of {', '.join(COMM_SCALINGS)}, got {value!r}"
        )


def _times_m(a: Affine, m: int) -> Affine:
    """`a` with its fixed costs paid m times (see `StageCosts.per_layer_loads`)."""
    return dataclasses.replace(a, beta=m * a.beta, fixed=m * a.fixed)


def _affine(stage: str, alpha: float, beta: float) -> Affine:
    try:
        return Affine(alpha=alpha, beta=beta)
    except UserInputError as exc:
        raise UserInputError(f"{stage}: {exc}") from None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)
