"""EngineConfig: how one serving deployment is shaped (mode, ratio, microbatches, cache, dtype).

Frozen and validated at construction with messages that name the field, so a bad flag or
argument fails before any model is loaded. Derived values are properties; per-worker variants are
made with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass

from afdserve.errors import UserInputError

MODES = ("aggregated", "afd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRANSPORTS = ("local", "shm", "torch", "tcp", "nixl")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
"""vLLM's --kv-cache-dtype names afdserve stores (model/kv_quant.py); `auto` is the model dtype."""
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
"""Other names accepted for them (vLLM's): the config keeps the canonical one."""


def check_device(device: object) -> str:
    """`device` if it names cpu, cuda or cuda:N, else a UserInputError. Whether CUDA is there is
    checked where torch is loaded (a config stays importable without torch)."""
    if isinstance(device, str) and (
        device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        return device
    raise UserInputError(f"device must be cpu, cuda or cuda:N, got {device!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "builtin:tiny-qwen3-moe"
    """A local HF-format model directory, or builtin:NAME (created on first use)."""
    mode: str = "afd"
    """`aggregated`: one worker runs both halves (the baseline); `afd`: r attention workers and
    m FFN workers exchange hidden states every layer."""
    attention_workers: int = 2
    """r, the number of attention workers (each with its own scheduler and KV cache). In
    aggregated mode, the number of independent replicas that each run both halves."""
    max_attention_workers: int = 0
    """AFD, multi-process: the most attention workers the group may have (R_MAX; 0: exactly
    `attention_workers`). The group starts with `attention_workers` of them and has rank slots
    0..R_MAX-1 for attention workers (FFN ranks follow), so more can join at run time
    (`POST /admin/attention_workers`); a slot with no worker is simply not in the data plane."""
    ffn_workers: int = 1
    """m, the FFN workers (AFD). Above 1, each MoE layer's experts are spread over them (expert
    parallelism: the attention workers route and send each token only where its experts are)
    and each dense layer's rows are split over them (each holds the whole MLP)."""
    eplb: bool = False
    """Expert load balancing (m >= 2): count each expert's tokens over a sliding window and
    re-place experts between steps, replicating hot ones (DeepSeek's EPLB; afdserve/eplb)."""
    eplb_window_size: int = 100
    """Steps of expert load the re-placement looks at (vLLM's eplb window_size)."""
    eplb_step_interval: int = 200
    """Steps between re-placements (vLLM's eplb step_interval)."""
    num_redundant_experts: int = 0
    """Extra expert slots per MoE layer over the FFN tier, filled with replicas of hot experts
    (vLLM's num_redundant_experts); each FFN worker holds (E + this) / m experts per layer."""
    max_restarts: int = 3
    """How many times the front of spawned workers may start a dead FFN worker again (in
    total; torchrun's --max-restarts). The FFN side is stateless: the attention workers keep
    their KV cache, wait, reconnect and run the interrupted step again, so no request is lost.
    Past it, an FFN death fails the group (WorkerError; the server exits for its supervisor).
    0: never restart."""
    ffn_failover: bool = True
    """With m > 1 FFN workers and an MoE model: when one dies, the surviving FFN workers take
    its experts (those they lack loaded from the model files) and the attention workers route
    to them at once, retrying the interrupted step there, instead of waiting for its restart;
    the restarted worker is given experts again by a two-phase re-placement (launch/failover.py).
    False: the attention workers wait for the restart (dense models always do)."""
    ffn_failover_max_experts: int = 0
    """The most experts of one MoE layer a surviving FFN worker may hold after a failover (its
    memory budget); a failover that would need more falls back to waiting for the restart.
    0: no limit."""
    migration_limit: int = 3
    """How many times one request may move to another attention worker because its own died
    or stalled (replayed there from prompt plus the tokens generated so far; Dynamo's
    --migration-limit); past it the request ends with an error. 0: never migrate."""
    microbatches: int = 2
    """M, the microbatches each attention worker splits a step into (ping-pong pipelining)."""
    dtype: str = "auto"
    """Weights and activations; `auto` takes the checkpoint's dtype."""
    device: str = "cpu"
    """Where weights, KV cache and activations live: `cpu`, `cuda` or `cuda:N`. Multi-process
    workers all use this device; host transports stage device tensors through host memory."""
    block_size: int = 64
    """Tokens per KV block. 64, not the 16 of GPU engines: the CPU attention reads a sequence's
    blocks one by one, and a 16-token block (4 KiB per head in fp32) is one page, so the
    hardware prefetcher restarts at every block; 64 took a decode step's attention from 3.36 to
    3.02 ms in fp32 and 2.29 to 1.82 ms in bf16 (BENCHMARKS.md, kernels). vLLM's CPU backend
    defaults to 128."""
    num_kv_blocks: int | None = None
    """KV blocks per attention worker (plus one reserved); None sizes it from kv_cache_gib."""
    kv_cache_gib: float = 1.0
    """KV memory budget per attention worker when num_kv_blocks is not given."""
    enable_prefix_caching: bool = True
    """Automatic prefix caching, on by default as in vLLM: each attention worker keeps full KV
    blocks by a chained hash of their tokens after their request ends and reuses them for any
    request that starts with the same tokens, whose prefill then skips them; the front routes a
    request to the worker holding its longest cached prefix when loads are close
    (engine/prefix_cache.py, afd/router.py). Outputs are the same either way."""
    kv_host_tier_gib: float = 0.0
    """KV host tier per attention worker (host memory, GiB): cached blocks the device pool
    evicts are copied there and brought back on a hit or a resume, so a preempted request
    resumes from the tier instead of by recompute. 0: none. Needs prefix caching."""
    num_host_kv_blocks: int | None = None
    """The host tier in blocks, overriding kv_host_tier_gib (tests, exact sizing)."""
    kv_cache_dtype: str = "auto"
    """How the KV cache stores keys and values (vLLM's --kv-cache-dtype): `auto`, the model dtype
    (exact as before); `int8` or `fp8` (e4m3; `fp8_e4m3` is taken as it), one byte per element
    plus a float32 scale per token and KV head, quantised on write and dequantised by the
    attention, so kv_cache_gib holds about 1.9x the blocks of a bf16 cache (3.8x of fp32)."""
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    """Context limit; None takes the model's max_position_embeddings."""
    sync_timeout_s: float = 30.0
    """Longest any worker waits for a peer's message before raising TransportTimeout."""
    transport: str = "local"
    """`local`: every worker in this process (threads). `shm`, `torch`, `tcp`, `nixl`: one process
    per worker, hidden states over that transport."""
    microbatch_tokens: int | None = None
    """Cap on tokens per microbatch; when set, a step's microbatch count follows from it."""
    worker_threads: int = 1
    """Torch threads in each worker process (multi-process transports)."""
    ffn_threads: int | None = None
    """Torch threads of the FFN worker process; None: worker_threads. The FFN does most of a
    layer's FLOPs, so on cores it shares with the attention workers it wants all of them."""
    ffn_gather_wait_s: float | None = None
    """How long the FFN waits for attention workers at the same (layer, microbatch) to batch
    them together (afd/ffn_worker.py); one that misses it is late for the rest of its step.
    None: 0.5 s or the sync timeout if shorter (a stalled worker never freezes the others);
    0: serve whoever has arrived, which keeps shared cores busy."""
    pin_workers: bool = False
    """Pin worker process k to core k mod cores (multi-process transports)."""
    worker_log_dir: str | None = None
    """Where the front's spawned workers write their logs (`worker-K.log`), for a log shipper
    to find; None: a new temporary directory, removed after a clean shutdown."""
    worker_log_max_bytes: int = 64 * 2**20
    """A worker log past this size is rotated to `worker-K.log.1` (one generation kept)."""
    seed: int = 0
    """Seeds the per-request sampling seeds of requests that bring none."""
    front: str = ""
    """HOST:PORT: do not start the workers, wait for workers started by hand (`afdserve worker
    --front HOST:PORT --rank K`, on this host or others) to connect. The front binds its events
    socket at PORT, worker rank k's control socket at PORT + 1 + k (attention ranks 0..r-1, FFN
    ranks r..r+m-1) and hosts the data transport's rendezvous store at PORT + 1 + r + m, on HOST (an
    address the workers can reach). Empty: the front starts every worker on this host."""
    startup_timeout_s: float = 120.0
    """Longest the front waits for every worker to report ready (multi-process transports)."""
    batch_invariant: bool = False
    """Exact mode: every GEMM runs on fixed row tiles, so a token's result never depends on what
    shares its batch and AFD gives the aggregated tokens bit for bit (model/kernels.py). Off:
    the fastest kernels; AFD then agrees with aggregated within rounding."""
    skip_tokenizer_init: bool = False
    """vLLM's option: load no tokenizer, serve token-id prompts only (outputs carry token ids and
    empty text; text prompts, chat and stop strings are refused). A model directory without
    tokenizer files is served this way whatever this says."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise UserInputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)
        if self.transport not in TRANSPORTS:
            raise UserInputError(
                f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}"
            )
        for name, low in (
            ("attention_workers", 1),
            ("ffn_workers", 1),
            ("microbatches", 1),
            ("block_size", 1),
            ("max_num_seqs", 1),
            ("max_num_batched_tokens", 1),
            ("eplb_window_size", 1),
            ("eplb_step_interval", 1),
            ("num_redundant_experts", 0),
            ("migration_limit", 0),
            ("max_restarts", 0),
            ("max_attention_workers", 0),
            ("ffn_failover_max_experts", 0),
            ("worker_log_max_bytes", 4096),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserInputError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.worker_log_dir is not None and (
            not isinstance(self.worker_log_dir, str) or not self.worker_log_dir
        ):
            raise UserInputError(
                f"worker_log_dir must be a non-empty path, got {self.worker_log_dir!r}"
            )
        if self.max_attention_workers and self.max_attention_workers < self.attention_workers:
            raise UserInputError(
                f"max_attention_workers ({self.max_attention_workers}) must be at least "
                f"attention_workers ({self.attention_workers}), or 0 for as many"
            )
        if self.attention_slots > self.attention_workers and self.mode != "afd":
            raise UserInputError(
                "max_attention_workers above attention_workers needs mode='afd' (attention "
                "workers join an AFD group's data plane at run time)"
            )
        if self.ffn_workers != 1 and self.mode != "afd":
            raise UserInputError(
                f"ffn_workers > 1 needs mode='afd' (aggregated workers hold their own FFN), "
                f"got ffn_workers={self.ffn_workers} with mode={self.mode!r}"
            )
        if not isinstance(self.ffn_failover, bool):
            raise UserInputError(f"ffn_failover must be a bool, got {self.ffn_failover!r}")
        if not isinstance(self.eplb, bool):
            raise UserInputError(f"eplb must be a bool, got {self.eplb!r}")
        if self.eplb and self.ffn_workers < 2:
            raise UserInputError(
                "eplb balances experts over several FFN workers: it needs ffn_workers >= 2"
            )
        if self.num_redundant_experts and not self.eplb:
            raise UserInputError("num_redundant_experts needs eplb (EPLB places the replicas)")
        if self.num_kv_blocks is not None and (
            not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2
        ):
            raise UserInputError(
                f"num_kv_blocks must be an integer >= 2, got {self.num_kv_blocks!r}"
            )
        if not self.kv_cache_gib > 0:
            raise UserInputError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib!r}")
        kv_dtype = self.kv_cache_dtype
        if isinstance(kv_dtype, str):
            kv_dtype = KV_CACHE_DTYPE_ALIASES.get(kv_dtype, kv_dtype)
        if kv_dtype not in KV_CACHE_DTYPES:
            names = ", ".join((*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES))
            raise UserInputError(
                f"kv_cache_dtype must be one of {names}, got {self.kv_cache_dtype!r}"
            )
        object.__setattr__(self, "kv_cache_dtype", kv_dtype)  # the canonical name
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise UserInputError(
                f"max_model_len must be a positive integer, got {self.max_model_len!r}"
            )
        if not self.sync_timeout_s > 0:
            raise UserInputError(f"sync_timeout_s must be > 0, got {self.sync_timeout_s!r}")
        if self.ffn_threads is not None and (
            isinstance(self.ffn_threads, bool)
            or not isinstance(self.ffn_threads, int)
            or self.ffn_threads < 1
        ):
            raise UserInputError(f"ffn_threads must be an integer >= 1, got {self.ffn_threads!r}")
        if self.ffn_gather_wait_s is not None and not (
            isinstance(self.ffn_gather_wait_s, (int, float))
            and not isinstance(self.ffn_gather_wait_s, bool)
            and self.ffn_gather_wait_s >= 0
        ):
            raise UserInputError(
                f"ffn_gather_wait_s must be a number of seconds >= 0, got {self.ffn_gather_wait_s!r}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise UserInputError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        if isinstance(self.kv_host_tier_gib, bool) or not (
            isinstance(self.kv_host_tier_gib, (int, float)) and self.kv_host_tier_gib >= 0
        ):
            raise UserInputError(
                f"kv_host_tier_gib must be a number >= 0, got {self.kv_host_tier_gib!r}"
            )
        if self.num_host_kv_blocks is not None and (
            isinstance(self.num_host_kv_blocks, bool)
            or not isinstance(self.num_host_kv_blocks, int)
            or self.num_host_kv_blocks < 0
        ):
            raise UserInputError(
                f"num_host_kv_blocks must be an integer >= 0, got {self.num_host_kv_blocks!r}"
            )
        if (self.kv_host_tier_gib or self.num_host_kv_blocks) and not self.enable_prefix_caching:
            raise UserInputError(
                "a KV host tier (kv_host_tier_gib, num_host_kv_blocks) keeps the blocks prefix "
                "caching evicts: it needs enable_prefix_caching"
            )
        if not isinstance(self.batch_invariant, bool):
            raise UserInputError(f"batch_invariant must be a bool, got {self.batch_invariant!r}")
        if not isinstance(self.skip_tokenizer_init, bool):
            raise UserInputError(
                f"skip_tokenizer_init must be a bool, got {self.skip_tokenizer_init!r}"
            )
        if not self.startup_timeout_s > 0:
            raise UserInputError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
        if self.front:
            from afdserve.transport.options import parse_host_port

            if self.transport == "local" or self.mode != "afd":
                raise UserInputError(
                    "front (workers started by hand) needs mode='afd' and a multi-process "
                    f"transport (shm, torch, tcp, nixl), got mode={self.mode!r}, "
                    f"transport={self.transport!r}"
                )
            _, port = parse_host_port(self.front, "front")
            if port + 1 + self.world_size > 65535:
                raise UserInputError(
                    f"front port {port} leaves no room for the {self.world_size} control "
                    "ports and the rendezvous port after it (PORT + 1 .. PORT + 1 + r + m)"
                )

    @property
    def front_addresses(self) -> tuple[str, list[str], str]:
        """With `front`: (events address, control address of each rank 0..R_MAX+m-1, as tcp:// URLs;
        the rendezvous store's HOST:PORT)."""
        host, _, port_s = self.front.rpartition(":")
        port = int(port_s)
        controls = [f"tcp://{host}:{port + 1 + k}" for k in range(self.world_size)]
        return f"tcp://{host}:{port}", controls, f"{host}:{port + 1 + self.world_size}"

    @property
    def attention_slots(self) -> int:
        """R_MAX: attention rank slots 0..R_MAX-1 (`max_attention_workers`, else r)."""
        return max(self.attention_workers, self.max_attention_workers)

    @property
    def world_size(self) -> int:
        """Worker ranks of an AFD group: attention slots 0..R_MAX-1, FFN R_MAX..R_MAX+m-1 (R_MAX
        is r unless `max_attention_workers` says more)."""
        return self.attention_slots + self.ffn_workers

    @property
    def ffn_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.attention_slots, self.world_size))

    @property
    def is_afd(self) -> bool:
        return self.mode == "afd"
