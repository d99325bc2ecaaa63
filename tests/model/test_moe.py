"""The MoE block's three ways to run its experts (the exact mode's tiled per-expert GEMMs, the
fast mode's grouped batched GEMM and its per-expert loop) against a per-token float64
reference of HF's routing: softmax over all experts, top-k, renormalise, weighted SwiGLU sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afdserve.model.config import ModelConfig
from afdserve.model.experts import GROUPED_ROWS
from afdserve.model.kernels import Kernels
from afdserve.model.layers import MoE
from afdserve.model.make_model import preset_config


def _moe(kernels: Kernels, seed: int = 0) -> tuple[MoE, dict[str, torch.Tensor]]:
    hf = preset_config("qwen3-moe", "small", 512)  # 16 experts, top-4, renormalised
    c = ModelConfig.from_hf_dict({**hf, "torch_dtype": "float32"})
    moe = MoE(c, torch.float32, kernels)
    g = torch.Generator().manual_seed(seed)
    d, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    w = {
        "gate": torch.randn(e, d, generator=g) * 0.3,
        "gate_up": torch.randn(e, 2 * i, d, generator=g) * d**-0.5,
        "down": torch.randn(e, d, i, generator=g) * i**-0.5,
    }
    with torch.no_grad():
        moe.gate.weight.copy_(w["gate"])
        moe.w_gate_up.copy_(w["gate_up"])
        moe.w_down.copy_(w["down"])
    moe.gate.prepare()
    moe.prepare()
    return moe, w


def _reference(x: torch.Tensor, w: dict[str, torch.Tensor], top_k: int) -> torch.Tensor:
    x, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    probs = F.softmax(x @ w["gate"].double().T, dim=-1)  # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(experts[t, j])
            gate, up = (w["gate_up"][e].double() @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w["down"][e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("tokens", [1, 5, 48, 4 * GROUPED_ROWS + 7], ids=lambda n: f"T{n}")
def test_moe_matches_a_per_token_reference(exact, tokens) -> None:
    """T = 1..48 take the fast mode's grouped GEMM, the largest its per-expert loop."""
    moe, w = _moe(Kernels(batch_invariant=exact))
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1))  # hidden 256
    got = moe(x)
    torch.testing.assert_close(got.double(), _reference(x, w, moe.top_k), rtol=1e-4, atol=1e-5)


def test_moe_paths_agree_and_the_exact_one_is_batch_invariant() -> None:
    fast, _ = _moe(Kernels())
    exact, _ = _moe(Kernels(batch_invariant=True))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fast(x), exact(x), rtol=1e-5, atol=1e-5)
    together = exact(x)
    for t in (0, 33, 69):
        assert torch.equal(exact(x[t : t + 1])[0], together[t])
