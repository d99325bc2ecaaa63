"""Catalogs, roofline coefficients, memory model and unit costs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from afdserve.errors import UserInputError
from afdserve.planner import (
    Efficiency,
    RooflineSetup,
    hardware_catalog,
    load_hardware,
    load_model,
    memory_model,
    model_catalog,
    roofline_costs,
    unit_costs,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "planner.md"

# published parameter counts (model cards): total, activated per token (billions)
PUBLISHED = {
    "llama-3.1-8b": (8.03, None),
    "llama-3.1-70b": (70.6, None),
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen3-235b-a22b": (235.0, 22.0),
    "mixtral-8x7b": (46.7, 12.9),
    "deepseek-v3": (671.0, 37.0),
    "step3": (316.0, 38.0),  # the LLM part (model card: 316B LLM, 38B activated)
}


def test_catalogs_cover_the_issue_and_cite_sources() -> None:
    models = model_catalog()
    assert set(PUBLISHED) <= set(models)
    hw = hardware_catalog()
    assert {"h100", "h200", "h800", "h20", "a100", "b200", "mi300x", "l40s", "ascend-910b"} <= set(
        hw
    )
    for entry in list(models.values()) + list(hw.values()):
        assert len(entry.source) > 20, entry.name
    for h in hw.values():
        assert h.fp8_flops is None or h.fp8_flops >= h.bf16_flops


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_sizes_match_published_parameter_counts(name) -> None:
    spec = load_model(name)
    total, active = PUBLISHED[name]
    assert spec.total_params / 1e9 == pytest.approx(total, rel=0.01)
    if active is not None:
        activated = (
            spec.num_layers * (spec.attention_params + spec.ffn_params_active)
            + spec.lm_head_params
            + spec.embedding_params
        )
        assert activated / 1e9 == pytest.approx(active, rel=0.03)


def test_kv_cache_per_token() -> None:
    assert load_model("llama-3.1-8b").kv_elems_per_token == 2 * 8 * 128
    assert load_model("qwen3-235b-a22b").kv_elems_per_token == 2 * 4 * 128
    assert load_model("deepseek-v3").kv_elems_per_token == 512 + 64  # MLA latent + rope key
    assert load_model("deepseek-v3").weight_dtype == "fp8"


def test_llama_8b_on_h100_roofline_by_hand() -> None:
    """Recompute every coefficient from the raw config and datasheet numbers."""
    d = roofline_costs(
        load_model("llama-3.1-8b"),
        load_hardware("h100"),
        load_hardware("h100"),
        RooflineSetup(batch=64),
    )
    c = d.costs
    h, kv_heads, hd, inter, vocab, L = 4096, 8, 128, 14336, 128256, 32
    mem, flops, nic = 3.35e12 * 0.9, 989e12 * 0.6, 50e9 * 0.8
    attn_params = 2 * h * h + 2 * h * kv_heads * hd
    assert c.num_layers == L
    assert c.attention.alpha == pytest.approx(2 * kv_heads * hd * 2 / mem * 1e3)
    head = max(vocab * h * 2 / mem, 2 * vocab * h * 64 / flops) * 1e3
    assert c.attention.beta == pytest.approx(attn_params * 2 / mem * 1e3 + head / L)
    assert c.ffn.alpha == pytest.approx(2 * 3 * h * inter / flops * 1e3)
    assert c.ffn.beta == pytest.approx(3 * h * inter * 2 / mem * 1e3)
    # a roofline: max(compute, weight streaming) plus 4 us for each of its 2 GEMM kernels
    assert c.ffn.combine == "max" and c.ffn.fixed == pytest.approx(2 * 0.004)
    assert c.t_ffn(64) == pytest.approx(max(64 * c.ffn.alpha, c.ffn.beta) + 0.008)
    assert c.comm.alpha == pytest.approx(h * 2 / nic * 1e3)
    assert c.comm.beta == pytest.approx(0.01)
    assert c.comm_scales_with == "B"


def test_h20_attention_projections_are_compute_bound_at_b64() -> None:
    d = roofline_costs(
        load_model("qwen3-235b-a22b"),
        load_hardware("h20"),
        load_hardware("h800"),
        RooflineSetup(batch=64, ffn_devices=8),
    )
    t = d.terms
    assert t["attention_proj_compute_ms"] > t["attention_proj_memory_ms"]
    # FFN spans 8 devices: its bandwidth and FLOP/s are 8x one device's
    assert t["ffn_memory_bw"] == pytest.approx(8 * 3.35e12 * 0.9)
    # each token's hidden state goes to the distinct FFN devices of its top-8 of 128 experts:
    # 5.34 expected over 8 devices (not min(k, devices) = 8)
    assert t["comm_fanout"] == pytest.approx(5.34, abs=0.01)
    assert any("experts" in note for note in d.notes)


def test_fp8_on_a100_falls_back_to_bf16_rate() -> None:
    d = roofline_costs(
        load_model("deepseek-v3"),
        load_hardware("a100"),
        load_hardware("a100"),
        RooflineSetup(batch=32, attention_devices=8, ffn_devices=64),
    )
    assert any("no FP8" in n for n in d.notes)
    assert d.terms["ffn_flops_per_s"] == pytest.approx(64 * 312e12 * Efficiency().moe_flops)


def test_rb_comm_uses_the_ffn_link_and_missing_links_are_errors() -> None:
    spec = load_model("llama-3.1-8b")
    rb = roofline_costs(
        spec,
        load_hardware("h100"),
        load_hardware("a100"),
        RooflineSetup(batch=8, comm_scales_with="rB"),
    )
    assert rb.costs.comm.alpha == pytest.approx(4096 * 2 / (25e9 * 0.8) * 1e3)
    with pytest.raises(UserInputError, match="no scale-out bandwidth"):
        roofline_costs(spec, load_hardware("l40s"), load_hardware("l40s"), RooflineSetup(batch=8))
    ok = roofline_costs(
        spec,
        load_hardware("l40s"),
        load_hardware("l40s"),
        RooflineSetup(batch=8, link_bw=100e9 / 8),
    )
    assert ok.costs.comm.alpha == pytest.approx(4096 * 2 / (12.5e9 * 0.8) * 1e3)


def test_memory_model() -> None:
    spec = load_model("qwen3-235b-a22b")
    m = memory_model(
        spec, load_hardware("h20"), load_hardware("h800"), RooflineSetup(batch=64, ffn_devices=8)
    )
    assert m.kv_bytes_per_context_token == 94 * 2 * 4 * 128 * 2
    assert m.ffn_fixed_bytes / 1e9 == pytest.approx(94 * 128 * 3 * 4096 * 1536 * 2 / 1e9, rel=0.01)
    assert m.ffn_capacity_bytes == pytest.approx(8 * 80 * 2**30 * 0.9)
    assert m.attention_capacity_bytes == pytest.approx(96e9 * 0.9)


def test_step3_unit_costs() -> None:
    h800 = load_hardware("h800")
    assert h800.price_per_hour == 2.0
    u_flop, u_byte = unit_costs(h800.price_per_hour, h800.bf16_flops, h800.memory_bw)
    assert u_flop == pytest.approx(5.617e-19, rel=1e-3)
    assert u_byte == pytest.approx(1.658e-16, rel=1e-3)


def test_efficiency_and_setup_validation() -> None:
    with pytest.raises(UserInputError, match="efficiency flops"):
        Efficiency(flops=0.0)
    with pytest.raises(UserInputError, match="GEMM latency"):
        Efficiency(gemm_latency_ms=-0.001)
    with pytest.raises(UserInputError, match="batch"):
        RooflineSetup(batch=0)
    with pytest.raises(UserInputError, match="kv_dtype"):
        RooflineSetup(batch=1, kv_dtype="int3")


def test_unknown_names() -> None:
    with pytest.raises(UserInputError, match="unknown hardware 'tpu9'"):
        load_hardware("tpu9")
    with pytest.raises(UserInputError, match="unknown model 'gpt-9'"):
        load_model("gpt-9")
    assert load_hardware("H100").name == "h100"
    assert load_hardware("910B").name == "ascend-910b"
    assert load_model("Qwen/Qwen3-235B-A22B").name == "qwen3-235b-a22b"


def test_local_config_json(tmp_path) -> None:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(tmp_path)
    assert spec.weight_dtype == "fp32" and spec.embedding_params == 0
    assert spec.attention_params == 64 * 64 * 2 + 2 * 64 * 32
    assert spec.kv_elems_per_token == 2 * 2 * 16
    assert load_model(tmp_path / "config.json") == spec
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserInputError, match="num_hidden_layers"):
        load_model(bad)


@pytest.mark.skipif(not DOCS.is_file(), reason="docs/planner.md not present")
def test_docs_quote_the_roofline_coefficients_the_code_derives() -> None:
    """docs/planner.md states coefficients beside their derivation; keep them true."""
    text = DOCS.read_text()
    cases = {
        "llama-3.1-8b": RooflineSetup(batch=64),
        "qwen3-30b-a3b": RooflineSetup(batch=64),
    }
    for name, setup in cases.items():
        h100 = load_hardware("h100")
        c = roofline_costs(load_model(name), h100, h100, setup).costs
        row = re.search(rf"^\| {re.escape(name)} \|(.+)$", text, re.M)
        assert row, f"no coefficient row for {name} in docs/planner.md"
        quoted = [float(x) for x in re.findall(r"[-+]?\d+\.\d+e[-+]\d+", row.group(1))]
        expected = [
            c.attention.alpha,
            c.attention.beta,
            c.ffn.alpha,
            c.ffn.beta,
            c.comm.alpha,
            c.comm.beta,
        ]
        assert quoted == pytest.approx(expected, rel=2e-3), name


def test_ffn_gemm_kernels_count_router_and_shared_experts() -> None:
    """Dense: gate/up and down; MoE adds the router; a shared expert adds its own two; the
    fixed FFN term is that count times `Efficiency.gemm_latency_ms`."""
    from afdserve.planner.roofline import ffn_gemm_kernels

    assert ffn_gemm_kernels(load_model("llama-3.1-8b")) == 2
    assert ffn_gemm_kernels(load_model("qwen3-235b-a22b")) == 3  # no shared expert
    assert ffn_gemm_kernels(load_model("step3")) == 5  # one shared expert
    h800 = load_hardware("h800")
    setup = RooflineSetup(batch=8, ffn_devices=8, efficiency=Efficiency(gemm_latency_ms=0.01))
    c = roofline_costs(load_model("step3", "fp8"), h800, h800, setup).costs
    assert c.ffn.fixed == pytest.approx(0.05)


def test_the_ffn_assumptions_are_knobs_of_the_roofline() -> None:
    """`Efficiency.ffn_combine` picks max (overlap) or sum of the FFN's compute and weight
    streaming (default: sum for an MoE FFN, max for a dense one); `moe_flops` is the MoE FFN's
    per-token fraction of peak (dense models keep `flops`; None: as dense)."""
    h100 = load_hardware("h100")
    setup = RooflineSetup(batch=64, attention_devices=8, ffn_devices=8)
    moe, dense = load_model("qwen3-235b-a22b", "fp8"), load_model("llama-3.1-8b")

    def ffn(model, **eff):
        s = dataclasses.replace(setup, efficiency=Efficiency(**eff))
        return roofline_costs(model, h100, h100, s).costs.ffn

    base = ffn(moe)
    assert base.combine == "sum" and ffn(dense).combine == "max"
    assert (
        ffn(moe, ffn_combine="max").combine == "max"
        and ffn(dense, ffn_combine="sum").combine == "sum"
    )
    assert ffn(moe, ffn_combine="max").alpha == base.alpha
    half = Efficiency().moe_flops / 2
    assert ffn(moe, moe_flops=half).alpha == pytest.approx(2 * base.alpha)
    assert ffn(moe, moe_flops=half).beta == base.beta
    assert ffn(moe, moe_flops=None).alpha == pytest.approx(
        base.alpha * Efficiency().moe_flops / 0.6
    )
    assert ffn(dense, moe_flops=0.3) == ffn(dense)
    for bad in ({"moe_flops": 0.0}, {"moe_flops": 1.5}, {"ffn_combine": "min"}):
        with pytest.raises(UserInputError):
            Efficiency(**bad)
