"""StageCosts: explicit numbers, the profile JSON schema, validation."""

from __future__ import annotations

import json

import pytest

from afdserve.errors import UserInputError
from afdserve.planner import Affine, StageCosts

PROFILE = {
    "source": "measured",
    "model": "llama-3.1-8b",
    "device": "h100",
    "units": "ms",
    "num_layers": 32,
    "attention": {"alpha": 1.5e-6, "beta": 0.03, "r2": 0.998, "max_rel_err": 0.04},
    "ffn": {"alpha": 5e-4, "beta": 0.13, "r2": 0.999, "max_rel_err": 0.02},
    "comm": {"alpha": 2e-4, "beta": 0.01, "r2": 0.97, "max_rel_err": 0.1, "scales_with": "B"},
}


def test_stage_times_are_affine() -> None:
    c = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
    assert c.t_attention(64 * 2000) == pytest.approx(7.0)
    assert c.t_ffn(128) == pytest.approx(3.56)
    assert c.t_comm(64) == pytest.approx(0.52)
    assert c.t_comm_for(64, 3) == pytest.approx(0.52)
    rb = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2, comm_scales_with="rB")
    assert rb.t_comm_for(64, 3) == pytest.approx(1.16)


def test_profile_round_trip(tmp_path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**PROFILE, "notes": "kept"}))
    c = StageCosts.from_profile(f)
    assert c.num_layers == 32 and c.source == "measured" and c.model == "llama-3.1-8b"
    assert c.attention == Affine(1.5e-6, 0.03, 0.998, 0.04)
    assert c.comm_scales_with == "B"
    assert c.to_profile_dict() == {**PROFILE, "notes": "kept"}
    assert StageCosts.from_profile_dict(c.to_profile_dict()) == c


def test_profile_defaults() -> None:
    d = {k: v for k, v in PROFILE.items() if k not in ("units", "num_layers", "source")}
    d["comm"] = {"alpha": 0.0, "beta": 0.0}
    c = StageCosts.from_profile_dict(d)
    assert c.num_layers == 1 and c.comm_scales_with == "B" and c.source == "measured"
    assert c.ffn.r2 == 0.999


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("ffn"), "missing object 'ffn'"),
        (lambda d: d["attention"].pop("beta"), "attention.beta is missing"),
        (lambda d: d["attention"].update(alpha=-1.0), "attention: alpha must be >= 0"),
        (lambda d: d["ffn"].update(beta="x"), "ffn: beta must be a finite number"),
        (lambda d: d.update(units="s"), "units must be 'ms'"),
        (lambda d: d.update(num_layers=0), "num_layers must be >= 1"),
        (lambda d: d["comm"].update(scales_with="r"), "comm_scales_with must be one of"),
        (lambda d: d["comm"].update(r2=float("nan")), "r2 must be a finite number"),
    ],
)
def test_bad_profiles(tmp_path, mutate, message) -> None:
    d = json.loads(json.dumps(PROFILE))
    mutate(d)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    with pytest.raises(UserInputError, match=message) as err:
        StageCosts.from_profile(f)
    assert str(f) in str(err.value)


def test_unreadable_profiles(tmp_path) -> None:
    with pytest.raises(UserInputError, match="cannot read profile"):
        StageCosts.from_profile(tmp_path / "none.json")
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        StageCosts.from_profile(f)
    f.write_text("[]")
    with pytest.raises(UserInputError, match="must be a JSON object"):
        StageCosts.from_profile(f)


def test_explicit_validation_names_the_stage() -> None:
    with pytest.raises(UserInputError, match="ffn: beta must be >= 0"):
        StageCosts.explicit(1e-5, 0.1, 0.01, -1.0)
    with pytest.raises(UserInputError, match="num_layers"):
        StageCosts.explicit(1e-5, 0.1, 0.01, 1.0, num_layers=0)


def test_roofline_combine_is_a_max_and_round_trips() -> None:
    """`combine="max"`: t(x) = max(alpha x, beta); per_layer_loads keeps it (M max(a x/M, b) =
    max(a x, M b)); the profile JSON writes and reads it; a fitted profile stays a sum."""
    f = Affine(0.01, 1.0, combine="max")
    assert f(50) == 1.0 and f(200) == 2.0
    assert f.line == (0.01, 0.0, 1.0) and Affine(0.01, 1.0).line == (0.01, 1.0, 0.0)
    costs = StageCosts(attention=Affine(1e-6, 0.1), ffn=f, comm=Affine(1e-4, 0.01))
    loads = costs.per_layer_loads(3)
    assert loads.ffn.combine == "max" and loads.ffn.beta == pytest.approx(3.0)
    assert loads.t_ffn(600) == pytest.approx(3 * f(600 / 3))
    d = costs.to_profile_dict()
    assert d["ffn"]["combine"] == "max" and "combine" not in d["attention"]
    assert StageCosts.from_profile_dict(d) == costs
    assert StageCosts.from_profile_dict(PROFILE).ffn.combine == "sum"
    with pytest.raises(UserInputError, match="combine"):
        Affine(0.01, 1.0, combine="min")
    # a fixed term (kernel latencies) adds to either form and is paid once per microbatch
    g = Affine(0.01, 1.0, combine="max", fixed=0.25)
    assert g(50) == 1.25 and g(200) == 2.25 and g.line == (0.01, 0.25, 1.25)
    assert Affine(0.01, 1.0, fixed=0.25)(100) == 2.25
    with_fixed = StageCosts(attention=Affine(1e-6, 0.1), ffn=g, comm=Affine(1e-4, 0.01))
    assert with_fixed.per_layer_loads(3).t_ffn(600) == pytest.approx(3 * g(200))
    assert StageCosts.from_profile_dict(with_fixed.to_profile_dict()) == with_fixed
    with pytest.raises(UserInputError, match="fixed"):
        Affine(0.01, 1.0, fixed=-1.0)


def _both(beta_ffn: float = 0.2) -> StageCosts:
    return StageCosts(
        attention=Affine(5e-5, 0.6),
        ffn=Affine(0.02, 1.0),
        comm=Affine(0.005, 0.2),
        comm_ffn=Affine(0.002, beta_ffn),
        comm_scales_with="both",
    )


def test_both_links_take_the_slower_and_collapse_to_the_busier_at_a_ratio() -> None:
    """'both': B tokens over an attention instance's link, r*B over the FFN's; one transfer
    runs at its slower end's rate. At a fixed r the busier link is the same at every batch
    when the fixed costs are equal, so `at_ratio` collapses it exactly."""
    c = _both()
    assert c.t_comm_for(64, 2) == pytest.approx(max(0.005 * 64, 0.002 * 128) + 0.2)
    assert c.t_comm_for(64, 3) == pytest.approx(0.002 * 192 + 0.2)  # the FFN's link binds
    for r in (1, 2, 3, 10):
        one = c.at_ratio(r)
        assert one.comm_scales_with == ("rB" if r * 0.002 > 0.005 else "B")
        assert one.comm_ffn is None
        for batch in (1, 7, 64, 500):
            assert one.t_comm_for(batch, r) == pytest.approx(c.t_comm_for(batch, r))
    with pytest.raises(UserInputError, match="no single-link equivalent"):
        _both(beta_ffn=0.3).at_ratio(2)
    assert StageCosts.explicit(1e-5, 0.1, 0.01, 1.0).at_ratio(5).comm_scales_with == "B"


def test_both_links_round_trip_validate_and_pay_m_latencies() -> None:
    c = _both()
    d = json.loads(json.dumps(c.to_profile_dict()))
    assert d["comm"]["scales_with"] == "both" and d["comm_ffn"] == {"alpha": 0.002, "beta": 0.2}
    back = StageCosts.from_profile_dict(d)
    assert back == c and "comm_ffn" not in back.extra
    assert c.per_layer_loads(3).comm_ffn.beta == pytest.approx(0.6)
    with pytest.raises(UserInputError, match="needs the FFN link"):
        StageCosts(attention=c.attention, ffn=c.ffn, comm=c.comm, comm_scales_with="both")
    with pytest.raises(UserInputError, match="comm_ffn prices the FFN's link"):
        StageCosts(attention=c.attention, ffn=c.ffn, comm=c.comm, comm_ffn=c.comm)
    with pytest.raises(UserInputError, match="comm_ffn.alpha is missing"):
        StageCosts.from_profile_dict({**d, "comm_ffn": {"beta": 0.1}})


def test_the_simulator_takes_one_link() -> None:
    from afdserve.sim.costs import SimCosts

    with pytest.raises(UserInputError, match="at_ratio"):
        SimCosts(_both())
    assert SimCosts(_both().at_ratio(4)).stages.comm_scales_with == "rB"
