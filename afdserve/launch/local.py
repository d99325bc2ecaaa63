"""Build an in-process engine from an EngineConfig: load the model once, split it into its
attention and FFN parts, and wire r attention workers to the FFN (AFD) or give each its own
FFN (aggregated).

In-process workers share one read-only copy of each part's weights; each attention worker has
its own scheduler and KV cache, exactly as it would in its own process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from afdserve.afd.attention_runner import AttentionRunner
from afdserve.afd.attention_worker import AttentionWorker
from afdserve.afd.expert_dispatch import ExpertDispatcher
from afdserve.afd.ffn_link import FFNLink, LocalFFN, RemoteFFN, result_timeout_s
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.config import EngineConfig, check_device
from afdserve.engine.config import CacheConfig, SchedulerConfig, worker_configs
from afdserve.engine.kv_cache import KVCache
from afdserve.engine.kv_tier import HostKVTier
from afdserve.engine.scheduler import Scheduler
from afdserve.eplb.initial import initial_placement
from afdserve.eplb.placement import Placement
from afdserve.errors import UserInputError
from afdserve.launch.inprocess import Engine
from afdserve.model.builtin import resolve_model
from afdserve.model.config import ModelConfig
from afdserve.model.experts import ExpertSet
from afdserve.model.kernels import Kernels
from afdserve.model.loader import load_weights
from afdserve.model.parts import (
    AttentionPart,
    FFNPart,
    RouterPart,
    expert_of,
    is_ffn_weight,
    is_router_weight,
)
from afdserve.model.tokenizer import TOKENIZER_FILE
from afdserve.transport.base import Transport
from afdserve.transport.local import LocalHub

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    config: ModelConfig
    dtype: torch.dtype
    attention: AttentionPart | None
    ffn: FFNPart | None
    router: RouterPart | None = None
    """The MoE layers' norms and routers on the attention side (expert parallelism)."""


def resolve_dtype(requested: str, config: ModelConfig) -> torch.dtype:
    return TORCH_DTYPES[config.dtype if requested == "auto" else requested]


def require_device(device: str) -> None:
    """UserInputError unless `device` (cpu, cuda, cuda:N) is on this host: checked before any
    weights are read, so a missing GPU is one clear message rather than a CUDA traceback."""
    check_device(device)
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UserInputError(f"device {device!r}: this host has no CUDA device")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise UserInputError(
            f"device {device!r}: this host has {torch.cuda.device_count()} CUDA device(s)"
        )


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "cpu",
    parts: tuple[str, ...] = ("attention", "ffn"),
    kernels: Kernels = Kernels(),
    held: Mapping[int, Sequence[int]] | None = None,
) -> LoadedModel:
    """Load `model` (a directory or builtin:NAME) and build the requested parts ("attention",
    "ffn", "router"), running `kernels`; an attention or FFN worker process reads only its own
    part's tensors, and an FFN worker under expert parallelism only the experts it holds
    (`held`: MoE layer -> expert ids)."""
    require_device(device)
    if kernels.batch_invariant and device == "cpu":
        from afdserve.model import native

        if native.paged_attention_kernel() is None:
            raise UserInputError(
                "batch_invariant on a CPU needs the native attention kernel (a C compiler: "
                f"cc, gcc or clang), which could not be built here: {native.build_error()}"
            )
    path = resolve_model(model)
    config = ModelConfig.from_dir(path)
    tdtype = resolve_dtype(dtype, config)

    def select(name: str) -> bool:
        if not is_ffn_weight(name):
            return "attention" in parts
        if "router" in parts and is_router_weight(name):
            return True
        if "ffn" not in parts:
            return False
        at = expert_of(name)
        return held is None or at is None or at[1] in held.get(at[0], ())

    weights = load_weights(path, config, tdtype, device, select=select)
    attention = ffn = router = None
    if "attention" in parts:
        attention = AttentionPart(config, tdtype, kernels).to(device)
        attention.load(weights)
    if "ffn" in parts:
        ffn = FFNPart(config, tdtype, kernels, held).to(device)
        ffn.load(weights)
    if "router" in parts and config.is_moe:
        if ffn is not None:
            router = RouterPart.of(ffn)
        else:
            router = RouterPart(config, tdtype, kernels).to(device)
            router.load(weights)
    return LoadedModel(path, config, tdtype, attention, ffn, router)


def make_link(
    index: int,
    cfg: EngineConfig,
    model: LoadedModel,
    transport: Transport,
    placement: Placement | None,
) -> RemoteFFN:
    """Attention worker `index`'s link to the FFN tier (both placements)."""
    dispatcher = None
    if cfg.ffn_workers > 1:
        dispatcher = ExpertDispatcher(index, cfg.ffn_workers, model.router, placement)
    return RemoteFFN(
        transport,
        cfg.ffn_ranks,
        timeout_s=result_timeout_s(cfg.sync_timeout_s),
        device=cfg.device,
        dispatcher=dispatcher,
    )


def cache_and_scheduler_configs(
    cfg: EngineConfig, model: ModelConfig, dtype: torch.dtype
) -> tuple[CacheConfig, SchedulerConfig]:
    max_len = cfg.max_model_len or model.max_position_embeddings
    if max_len > model.max_position_embeddings:
        raise UserInputError(
            f"max_model_len {max_len} exceeds the model's max_position_embeddings {model.max_position_embeddings}"
        )
    budget_blocks = None
    per_block = KVCache.bytes_per_block(model, cfg.block_size, dtype, cfg.kv_cache_dtype)
    if cfg.num_kv_blocks is None:
        budget_blocks = int(cfg.kv_cache_gib * 2**30) // per_block
    host_blocks = cfg.num_host_kv_blocks
    if host_blocks is None:
        host_blocks = int(cfg.kv_host_tier_gib * 2**30) // per_block
        if cfg.kv_host_tier_gib and host_blocks < 1:
            raise UserInputError(
                f"kv_host_tier_gib {cfg.kv_host_tier_gib} holds no KV block ({per_block} bytes)"
            )
    return worker_configs(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=max_len,
        block_size=cfg.block_size,
        num_blocks=cfg.num_kv_blocks,
        budget_blocks=budget_blocks,
        enable_prefix_caching=cfg.enable_prefix_caching,
        num_host_blocks=host_blocks,
    )


def kv_capacity(cfg: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> str:
    """One line on what an attention worker's KV cache holds (logged at start, like vLLM's
    "GPU KV cache size" and "Maximum concurrency" lines): blocks, bytes per block in its
    kv_cache_dtype, and how many sequences of max_model_len fit at once."""
    cache_cfg, sched_cfg = cache_and_scheduler_configs(cfg, model, dtype)
    per_block = KVCache.bytes_per_block(model, cache_cfg.block_size, dtype, cfg.kv_cache_dtype)
    kv_dtype = (
        str(dtype).removeprefix("torch.") if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype
    )
    ctx = sched_cfg.max_model_len
    seqs = cache_cfg.num_usable_blocks // cache_cfg.blocks_for(ctx)
    return (
        f"KV cache {cache_cfg.num_usable_blocks} blocks of {cache_cfg.block_size} tokens "
        f"({kv_dtype}, {per_block} bytes per block, "
        f"{cache_cfg.num_blocks * per_block / 2**20:.1f} MiB); "
        f"{seqs} sequences of {ctx} tokens fit at once"
    )


def make_attention_worker(
    index: int, cfg: EngineConfig, model: LoadedModel, link: FFNLink
) -> AttentionWorker:
    """Attention worker `index` of `cfg`: its own scheduler and KV cache, and a runner on the
    loaded attention part that reaches the FFN through `link`. The one recipe both placements
    (threads here, a worker process in launch/worker.py) use."""
    cache_cfg, sched_cfg = cache_and_scheduler_configs(cfg, model.config, model.dtype)
    kv = KVCache(
        model.config,
        cache_cfg.num_blocks,
        cache_cfg.block_size,
        model.dtype,
        cfg.device,
        kv_cache_dtype=cfg.kv_cache_dtype,
    )
    log.info("attention worker %d: %s", index, kv_capacity(cfg, model.config, model.dtype))
    tier = HostKVTier(kv, cache_cfg.num_host_blocks) if cache_cfg.num_host_blocks else None
    runner = AttentionRunner(
        model.attention,
        kv,
        link,
        cfg.microbatches,
        cfg.microbatch_tokens,
        eos_token_ids=model.config.eos_token_ids,
        tokenizer_file=model.path / TOKENIZER_FILE,
        host_tier=tier,
    )
    scheduler = Scheduler(sched_cfg, cache_cfg, eos_token_ids=model.config.eos_token_ids)
    return AttentionWorker(index, scheduler, runner)


def make_ffn_worker(
    cfg: EngineConfig,
    model: LoadedModel,
    transport: Transport,
    placement: Placement | None = None,
) -> FFNWorker:
    """The FFN worker on `transport` (rank R_MAX + j), serving attention slots 0..R_MAX-1 (both
    placements; a slot with no worker sends no SYNC, so it is never waited for); under expert
    parallelism it serves the experts `placement` gives it."""
    experts = {}
    if placement is not None:
        j = transport.rank - cfg.attention_slots
        for layer, workers in enumerate(placement.layers):
            if workers is not None:
                experts[layer] = held_experts(model.ffn, layer, workers[j])
    return FFNWorker(
        model.ffn,
        transport,
        attention_ranks=range(cfg.attention_slots),
        timeout_s=cfg.sync_timeout_s,
        gather_wait_s=cfg.ffn_gather_wait_s,
        experts=experts,
    )


def load_experts(
    model: str, cfg: EngineConfig, config: ModelConfig, wanted: Mapping[int, Sequence[int]]
) -> dict[int, ExpertSet]:
    """Layer -> the experts `wanted` read from the model's files (an FFN worker process given
    experts it lacks by a re-placement; only their tensors are read)."""
    from afdserve.model.parts import expert_sets

    dtype = resolve_dtype(cfg.dtype, config)

    def select(name: str) -> bool:
        at = expert_of(name)
        return at is not None and at[1] in wanted.get(at[0], ())

    weights = load_weights(resolve_model(model), config, dtype, cfg.device, select=select)
    return expert_sets(weights, config, Kernels(batch_invariant=cfg.batch_invariant))


def held_experts(ffn: FFNPart, layer: int, ids: Sequence[int]) -> ExpertSet:
    """Layer `layer`'s experts `ids` from `ffn`: its own set when that is exactly them, else a
    subset of it (an in-process engine's FFN part holds every expert)."""
    have = ffn.layers[layer].mlp.experts
    return have if have.ids == tuple(ids) else have.subset(ids)


def build_engine(cfg: EngineConfig, model: LoadedModel | None = None) -> tuple[Engine, LoadedModel]:
    """An in-process engine for `cfg` (transport `local`). Returns it with the loaded model."""
    if cfg.transport != "local":
        raise UserInputError(
            f"transport {cfg.transport!r} runs workers in separate processes: use the multi-process launcher"
        )
    m = model or load_model(
        cfg.model, cfg.dtype, cfg.device, kernels=Kernels(batch_invariant=cfg.batch_invariant)
    )
    if m.router is None and m.ffn is not None and m.config.is_moe:
        m = dataclasses.replace(m, router=RouterPart.of(m.ffn))
    if cfg.attention_slots > cfg.attention_workers:
        raise UserInputError(
            "max_attention_workers (attention workers added at run time) needs worker "
            "processes: use a transport other than local"
        )
    cache_and_scheduler_configs(cfg, m.config, m.dtype)  # a bad max_model_len: before any hub
    r = cfg.attention_workers
    links: list[FFNLink]
    ffn_workers = []
    on_close = []
    balancer = None
    if cfg.is_afd:
        placement = initial_placement(cfg.ffn_workers, m.config)
        hub = LocalHub(cfg.world_size)
        links = [make_link(k, cfg, m, hub.endpoints[k], placement) for k in range(r)]
        ffn_workers = [make_ffn_worker(cfg, m, hub.endpoints[j], placement) for j in cfg.ffn_ranks]
        on_close.append(hub.close)
        if placement is not None:
            from afdserve.eplb.controller import EPLBController
            from afdserve.launch.balancer import LocalBalancer

            dispatchers = [link.dispatcher for link in links]
            balancer = LocalBalancer(
                EPLBController(cfg, placement), m.ffn, ffn_workers, dispatchers
            )
    else:
        links = [LocalFFN(m.ffn) for _ in range(r)]
    workers = [make_attention_worker(k, cfg, m, links[k]) for k in range(r)]
    engine = Engine(
        workers,
        m.config.vocab_size,
        ffn_workers,
        seed=cfg.seed,
        on_close=on_close,
        ffn_threads=cfg.ffn_threads,
        tokenizer_file=m.path / TOKENIZER_FILE,
        balancer=balancer,
    )
    return engine, m
