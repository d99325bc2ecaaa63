"""A prefix hit rate and the KV dtype reach the simulator and planner (issue 19, part 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import RooflineSetup, load_hardware, load_model, roofline_costs
from afdserve.planner.prefix import cached_from_hash_ids, cached_from_rate, hit_rate
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.engine import simulate
from afdserve.sim.requests import RequestSet


def test_hash_ids_give_the_leading_blocks_seen_before(tmp_path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 1, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 7]},
        {"timestamp": 2, "input_length": 600, "output_length": 5, "hash_ids": [0, 9]},
        {"timestamp": 3, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 4, "input_length": 700, "output_length": 5, "hash_ids": [5, 1]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cached = cached_from_hash_ids(path, block_tokens=512)
    # 2 blocks; 1 block; all of it but the token that samples; nothing (a prefix match only)
    assert cached.tolist() == [0, 1024, 512, 1023, 0]
    assert hit_rate(cached, np.array([r["input_length"] for r in rows])) == pytest.approx(
        2559 / 4924
    )
    path.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1}) + "\n")
    with pytest.raises(UserInputError, match="hash_ids"):
        cached_from_hash_ids(path)


def test_a_given_rate_leaves_one_token_to_compute() -> None:
    assert cached_from_rate(np.array([1000, 1, 0]), 0.5).tolist() == [500, 0, 0]
    assert cached_from_rate(np.array([10]), 0.99).tolist() == [9]
    with pytest.raises(UserInputError):
        cached_from_rate(np.array([10]), 1.0)


def test_cached_prefixes_shorten_prefill_and_ttft() -> None:
    costs = SimCosts.explicit(1e-5, 0.01, 1e-3, 0.05, prefill_token_ms=1e-3, num_layers=4)
    cfg = BundleConfig(slots=8, pipeline="colocated", prefill="chunked", token_budget=512)
    n = 32
    p = np.full(n, 2000)
    args = (p, np.full(n, 8), np.linspace(0, 0.5, n))
    cold = simulate(costs, cfg, RequestSet(*args))
    warm = simulate(costs, cfg, RequestSet(*args, cached_len=np.full(n, 1500)))
    assert warm.finish.size == cold.finish.size == n
    ttft = lambda run: float(np.mean(run.first_token - run.arrival))  # noqa: E731
    assert ttft(warm) < 0.6 * ttft(cold)
    with pytest.raises(UserInputError, match="cached prefix"):
        RequestSet(*args, cached_len=np.full(n, 2000))


def test_kv_dtype_sets_the_attention_read() -> None:
    spec, h100 = load_model("qwen3-235b-a22b"), load_hardware("h100")
    alpha = {
        kv: roofline_costs(spec, h100, h100, RooflineSetup(batch=64, kv_dtype=kv)).costs
        for kv in ("bf16", "fp8", "int8")
    }
    assert alpha["fp8"].attention.alpha == pytest.approx(alpha["bf16"].attention.alpha / 2)
    assert alpha["int8"].attention.alpha == alpha["fp8"].attention.alpha
