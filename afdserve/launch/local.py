"""Build an in-process engine from an EngineConfig: load the model once, split it into its
attention and FFN parts, and wire r attention workers to the FFN (AFD) or give each its own
FFN (aggregated).

In-process workers share one read-only copy of each part's weights; each attention worker has
its own scheduler and KV cache, exactly as it would in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from afdserve.afd.attention_runner import AttentionRunner
from afdserve.afd.attention_worker import AttentionWorker
from afdserve.afd.ffn_link import FFNLink, LocalFFN, RemoteFFN, result_timeout_s
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.config import EngineConfig, check_device
from afdserve.engine.config import CacheConfig, SchedulerConfig, worker_configs
from afdserve.engine.kv_cache import KVCache
from afdserve.engine.scheduler import Scheduler
from afdserve.errors import UserInputError
from afdserve.launch.inprocess import Engine
from afdserve.model.builtin import resolve_model
from afdserve.model.config import ModelConfig
from afdserve.model.kernels import Kernels
from afdserve.model.loader import load_weights
from afdserve.model.parts import AttentionPart, FFNPart, is_ffn_weight
from afdserve.model.tokenizer import TOKENIZER_FILE
from afdserve.transport.base import Transport
from afdserve.transport.local import LocalHub

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    config: ModelConfig
    dtype: torch.dtype
    attention: AttentionPart | None
    ffn: FFNPart | None


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
) -> LoadedModel:
    """Load `model` (a directory or builtin:NAME) and build the requested parts, running
    `kernels`; an attention or FFN worker process reads only its own part's tensors."""
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
    if parts == ("attention",):
        select = lambda name: not is_ffn_weight(name)  # noqa: E731
    elif parts == ("ffn",):
        select = is_ffn_weight
    else:
        select = None
    weights = load_weights(path, config, tdtype, device, select=select)
    attention = ffn = None
    if "attention" in parts:
        attention = AttentionPart(config, tdtype, kernels).to(device)
        attention.load(weights)
    if "ffn" in parts:
        ffn = FFNPart(config, tdtype, kernels).to(device)
        ffn.load(weights)
    return LoadedModel(path, config, tdtype, attention, ffn)


def cache_and_scheduler_configs(
    cfg: EngineConfig, model: ModelConfig, dtype: torch.dtype
) -> tuple[CacheConfig, SchedulerConfig]:
    max_len = cfg.max_model_len or model.max_position_embeddings
    if max_len > model.max_position_embeddings:
        raise UserInputError(
            f"max_model_len {max_len} exceeds the model's max_position_embeddings {model.max_position_embeddings}"
        )
    budget_blocks = None
    if cfg.num_kv_blocks is None:
        per_block = KVCache.bytes_per_block(model, cfg.block_size, dtype)
        budget_blocks = int(cfg.kv_cache_gib * 2**30) // per_block
    return worker_configs(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=max_len,
        block_size=cfg.block_size,
        num_blocks=cfg.num_kv_blocks,
        budget_blocks=budget_blocks,
    )


def make_attention_worker(
    index: int, cfg: EngineConfig, model: LoadedModel, link: FFNLink
) -> AttentionWorker:
    """Attention worker `index` of `cfg`: its own scheduler and KV cache, and a runner on the
    loaded attention part that reaches the FFN through `link`. The one recipe both placements
    (threads here, a worker process in launch/worker.py) use."""
    cache_cfg, sched_cfg = cache_and_scheduler_configs(cfg, model.config, model.dtype)
    kv = KVCache(model.config, cache_cfg.num_blocks, cache_cfg.block_size, model.dtype, cfg.device)
    runner = AttentionRunner(
        model.attention,
        kv,
        link,
        cfg.microbatches,
        cfg.microbatch_tokens,
        eos_token_ids=model.config.eos_token_ids,
        tokenizer_file=model.path / TOKENIZER_FILE,
    )
    scheduler = Scheduler(sched_cfg, cache_cfg, eos_token_ids=model.config.eos_token_ids)
    return AttentionWorker(index, scheduler, runner)


def make_ffn_worker(cfg: EngineConfig, model: LoadedModel, transport: Transport) -> FFNWorker:
    """The FFN worker of `cfg` on `transport`, serving attention ranks 0..r-1 (both placements)."""
    return FFNWorker(
        model.ffn,
        transport,
        attention_ranks=range(cfg.attention_workers),
        timeout_s=cfg.sync_timeout_s,
        gather_wait_s=cfg.ffn_gather_wait_s,
    )


def build_engine(cfg: EngineConfig, model: LoadedModel | None = None) -> tuple[Engine, LoadedModel]:
    """An in-process engine for `cfg` (transport `local`). Returns it with the loaded model."""
    if cfg.transport != "local":
        raise UserInputError(
            f"transport {cfg.transport!r} runs workers in separate processes: use the multi-process launcher"
        )
    m = model or load_model(
        cfg.model, cfg.dtype, cfg.device, kernels=Kernels(batch_invariant=cfg.batch_invariant)
    )
    cache_and_scheduler_configs(cfg, m.config, m.dtype)  # a bad max_model_len: before any hub
    r = cfg.attention_workers
    links: list[FFNLink]
    ffn_worker = None
    on_close = []
    if cfg.is_afd:
        hub = LocalHub(r + 1)
        links = [
            RemoteFFN(
                hub.endpoints[k],
                ffn_rank=r,
                timeout_s=result_timeout_s(cfg.sync_timeout_s),
                device=cfg.device,
            )
            for k in range(r)
        ]
        ffn_worker = make_ffn_worker(cfg, m, hub.endpoints[r])
        on_close.append(hub.close)
    else:
        links = [LocalFFN(m.ffn) for _ in range(r)]
    workers = [make_attention_worker(k, cfg, m, links[k]) for k in range(r)]
    engine = Engine(
        workers,
        m.config.vocab_size,
        ffn_worker,
        seed=cfg.seed,
        on_close=on_close,
        ffn_threads=cfg.ffn_threads,
        tokenizer_file=m.path / TOKENIZER_FILE,
    )
    return engine, m
