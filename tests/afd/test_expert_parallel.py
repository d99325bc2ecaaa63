"""rA:mF: experts spread over m FFN workers (each token sent only where its top-k experts are),
dense layers' rows split over m MLP replicas; the tokens and log-probabilities are exactly the
aggregated ones in the exact mode, for any r and m (experts not divisible by m, A < F too)."""

from __future__ import annotations

import itertools

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.afd.expert_dispatch import ExpertDispatcher
from afdserve.eplb.placement import Placement
from afdserve.errors import UserInputError
from afdserve.model.experts import route

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (k,), generator=g).tolist() for k in (1, 2, 5, 13, 31, 64, 3)]


def _run(model_dir, **engine):
    llm = LLM(str(model_dir), batch_invariant=True, **engine)
    try:
        outs = llm.generate(_prompts(), GREEDY)
        return [(o.token_ids, o.logprobs) for o in outs], llm
    finally:
        llm.close()


@pytest.fixture(scope="module")
def aggregated(tiny_model_dirs):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch], _ = _run(
                tiny_model_dirs[arch], mode="aggregated", attention_workers=1, microbatches=1
            )
        return cache[arch]

    return get


# qwen3-moe: 8 experts top-2 and a dense layer among the MoE ones; mixtral: 4 experts top-2
# (3 FFN workers hold 1, 1 and 2); llama: dense, rows split over MLP replicas
CASES = (
    [("qwen3-moe", r, m) for r, m in itertools.product((1, 2, 3), (2, 3, 4))]
    + [("mixtral", r, m) for r, m in ((1, 2), (2, 3), (3, 4), (1, 4))]
    + [("llama", r, m) for r, m in ((1, 2), (2, 3), (3, 4))]
)


@pytest.mark.parametrize("arch,r,m", CASES)
def test_expert_parallel_afd_equals_aggregated(tiny_model_dirs, aggregated, arch, r, m):
    tokens, llm = _run(
        tiny_model_dirs[arch], mode="afd", attention_workers=r, ffn_workers=m, microbatches=2
    )
    assert tokens == aggregated(arch)
    ffns = llm.engine.ffns
    assert len(ffns) == m
    served = [sum(h.sum for h in f.stats.snapshot().ffn_batch_tokens.values()) for f in ffns]
    assert all(n > 0 for n in served), served  # every FFN worker took part
    if arch != "llama":  # each holds only its share of each MoE layer's experts, once
        c = llm.model_config
        for layer in range(c.num_hidden_layers):
            held = [f.experts[layer].ids for f in ffns] if c.is_moe_layer(layer) else []
            assert sorted(e for ids in held for e in ids) == list(range(c.num_experts)) or not held
            assert all(layer not in f.experts for f in ffns) or c.is_moe_layer(layer)


def test_a_dense_model_splits_rows_over_mlp_replicas():
    """Chunk c of a layer's rows goes to FFN worker (c + rank) mod m: whole rows, so exact."""
    d = ExpertDispatcher(rank=1, num_ffn=3, router=None, placement=None)
    h = torch.arange(14.0).view(7, 2)
    sends, dispatch = d.plan(0, h)
    assert [s.x.shape[0] for s in sends] == [3, 2, 2]  # workers 0, 1, 2 get chunks 2, 0, 1
    assert torch.equal(sends[1].x, h[:2]) and torch.equal(sends[2].x, h[2:4])
    assert torch.equal(sends[0].x, h[4:])
    out = d.gather(dispatch, [s.x * 10 for s in sends], h)
    assert torch.equal(out, h * 10)


class _OneLayerRouter:
    """A RouterPart stand-in: fixed router logits per token."""

    def __init__(self, logits: torch.Tensor, top_k: int) -> None:
        self.logits, self.top_k = logits, top_k

    def route(self, layer, h):
        return (h, *route(self.logits, self.top_k, True, h.dtype))


def test_a_replicated_expert_splits_its_tokens_over_its_replicas():
    # expert 0 is on workers 0 and 1, expert 1 on worker 1: six tokens all pick 0 then 1
    placement = Placement(2, 2, (((0,), (0, 1)),))
    logits = torch.tensor([[2.0, 1.0]] * 6)
    for rank, first in ((0, 0), (1, 1)):
        d = ExpertDispatcher(rank, 2, _OneLayerRouter(logits, 2), placement)
        sends, dispatch = d.plan(0, torch.randn(6, 4))
        on = [s.routing for s in sends]
        zero_on = [int((t[:, 0] == 0).sum()) for t in on]
        assert zero_on == [3, 3]  # expert 0's six pairs: three per replica
        assert int(on[first][0, 0]) == 0  # the deal starts at replica `rank`
        assert int((on[1][:, 1] == 1).sum()) == 6 and bool((on[0][:, 1] == -1).all())
        assert d.take_counts() == {0: [6, 6]}


def test_gather_refuses_a_reply_of_the_wrong_size():
    d = ExpertDispatcher(rank=0, num_ffn=2, router=None, placement=None)
    sends, dispatch = d.plan(0, torch.ones(4, 3))
    with pytest.raises(ValueError, match="FFN reply"):
        d.gather(dispatch, [torch.ones(1, 3), sends[1].x], torch.ones(4, 3))


@pytest.mark.parametrize(
    "opts,match",
    [
        (dict(mode="aggregated", ffn_workers=2), "needs mode='afd'"),
        (dict(ffn_workers=0), "ffn_workers must be an integer >= 1"),
        (dict(eplb=True), "needs ffn_workers >= 2"),
        (dict(ffn_workers=2, num_redundant_experts=2), "needs eplb"),
        (dict(ffn_workers=2, eplb=True, eplb_window_size=0), "eplb_window_size"),
        (dict(ffn_workers=2, ffn_failover="yes"), "ffn_failover must be a bool"),
        (dict(ffn_workers=2, ffn_failover_max_experts=-1), "ffn_failover_max_experts"),
    ],
)
def test_expert_parallel_options_are_checked(opts, match):
    from afdserve.config import EngineConfig

    with pytest.raises(UserInputError, match=match):
        EngineConfig(**opts)


@pytest.fixture(scope="module")
def skewed_moe(tmp_path_factory):
    from afdserve.model.make_model import make_model

    return make_model(
        "qwen3-moe", "tiny", 0, tmp_path_factory.mktemp("skew") / "m", router_skew=1.0
    )


def test_eplb_replaces_hot_experts_at_run_time_without_changing_a_token(skewed_moe):
    reference, _ = _run(skewed_moe, mode="aggregated", attention_workers=1, microbatches=1)
    tokens, llm = _run(
        skewed_moe,
        mode="afd",
        attention_workers=2,
        ffn_workers=2,
        microbatches=2,
        eplb=True,
        eplb_window_size=4,
        eplb_step_interval=3,
        num_redundant_experts=2,
    )
    assert tokens == reference
    st = llm.engine.state().experts
    assert st.placement_version >= 1 and st.replacements >= 1, st
    version, before, after = st.history[0]
    assert after < before, st.history
    assert "*" in st.placement  # a hot expert got a replica
    from prometheus_client import CollectorRegistry, generate_latest

    from afdserve.server.engine_metrics import EngineCollector

    registry = CollectorRegistry()
    registry.register(EngineCollector("m", llm.config, llm.engine.state, lambda: True))
    text = generate_latest(registry).decode()
    assert f'afdserve:eplb_last_imbalance{{model_name="m",placement="after"}} {after}' in text
    moe = [i for i, x in enumerate(st.imbalance) if x is not None]
    assert sum(st.pairs_total[i][0] for i in moe) > 0


def test_without_eplb_the_load_is_counted_and_the_placement_stays(skewed_moe):
    _, llm = _run(skewed_moe, mode="afd", attention_workers=1, ffn_workers=2, microbatches=1)
    st = llm.engine.state().experts
    assert st.placement_version == 0 and st.replacements == 0
    moe = [x for x in st.imbalance if x is not None]
    assert moe and max(moe) > 1.2  # the hot expert sits on one worker
    from prometheus_client import CollectorRegistry, generate_latest

    from afdserve.server.engine_metrics import EngineCollector

    registry = CollectorRegistry()
    registry.register(EngineCollector("m", llm.config, llm.engine.state, lambda: True))
    text = generate_latest(registry).decode()
    for name in ("expert_load_total", "ffn_expert_imbalance", "ffn_tokens_total"):
        assert f"afdserve:{name}" in text, name
    assert 'afdserve:ffn_tokens_total{model_name="m",worker="1"}' in text
