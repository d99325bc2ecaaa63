"""Worker processes: `afdserve worker --disaggregation-mode attention|ffn ...`.

An attention worker owns a scheduler, a KV cache and the attention part; an FFN worker owns the
FFN part. Start-up, in order:
1. load only this worker's part of the model;
2. handshake: the FFN worker binds `--afd-ffn-endpoint` (ZeroMQ REP); every attention worker
   sends its model fingerprint (name, layers, hidden size, dtype, vocabulary) and gets `ready`
   or a refusal naming the mismatch; the FFN worker refuses to serve a mismatched group;
3. connect the data transport (shm, torch, tcp, nixl) to its peers;
4. tell the front `ready` on the control plane, then run its one loop.

Every wait has a deadline. SIGTERM/SIGINT stop the loop and close the transport (which unlinks
shared memory); on Linux a worker also dies with its parent (PR_SET_PDEATHSIG), and any worker
exits (code 4) when the front, which pings it every second, falls silent for --front-timeout-s
(the only sign a worker started by hand gets).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from afdserve.config import check_device
from afdserve.errors import UserInputError

log = logging.getLogger("afdserve.worker")

HEARTBEAT_S = 1.0
STATS_EVERY_S = 0.5
"""AFD stats ride on an attention worker's events messages at most this often (and on every
heartbeat), so the front's metrics lag by at most this much while the worker steps."""


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process's settings (each from a flag or an AFDSERVE_* environment variable)."""

    disaggregation_mode: str
    """`attention` or `ffn`."""
    model: str
    afd_attention_ratio: int
    """r: attention workers in the group (ranks 0..r-1); the FFN worker has rank r."""
    afd_ffn_endpoint: str
    """ZeroMQ address of the FFN worker's handshake socket, e.g. tcp://127.0.0.1:5555."""
    transport: str = "shm"
    rendezvous: str = ""
    """HOST:PORT of the data transport's rendezvous store (hosted by rank 0)."""
    rank: int = 0
    host: str = ""
    """Address peers reach this worker's data sockets at (tcp: bind and advertise; torch: gloo's
    interface). Empty: tcp binds 127.0.0.1 (one host), torch picks by the rendezvous address."""
    afd_microbatches: int = 2
    afd_microbatch_size: int = 0
    """Cap on tokens per microbatch (0: none); the count of microbatches grows to respect it."""
    afd_sync_timeout_ms: float = 30_000.0
    afd_gather_wait_ms: float = -1.0
    """FFN: how long a batch waits for attention workers at its position (-1: the sync
    timeout, always gather; 0: serve whoever has arrived)."""
    control: str = ""
    """Front's address this worker pulls requests from (attention) or commands from (ffn)."""
    events: str = ""
    """Front's address this worker pushes events, errors and heartbeats to."""
    dtype: str = "auto"
    device: str = "cpu"
    """cpu, cuda or cuda:N. Host transports carry device tensors through host memory."""
    threads: int = 1
    cpus: str = ""
    """Comma-separated cores to pin this process to (empty: no pinning)."""
    block_size: int = 64
    num_kv_blocks: int = 0
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0
    batch_invariant: int = 0
    """1: exact (batch-invariant) kernels; every worker of a group must agree."""
    connect_timeout_s: float = 60.0
    front_timeout_s: float = 30.0
    """Exit (code 4) once the front, after its first message, has been silent this long: it
    pings every `control.PING_S`, so silence means it died (0: never). A worker the front
    spawned also dies with it (PR_SET_PDEATHSIG); one started by hand relies on this."""

    def __post_init__(self) -> None:
        if self.disaggregation_mode not in ("attention", "ffn"):
            raise UserInputError(
                f"--disaggregation-mode must be attention or ffn, got {self.disaggregation_mode!r}"
            )
        if self.afd_attention_ratio < 1:
            raise UserInputError(
                f"--afd-attention-ratio must be >= 1, got {self.afd_attention_ratio}"
            )
        if (
            self.disaggregation_mode == "attention"
            and not 0 <= self.rank < self.afd_attention_ratio
        ):
            raise UserInputError(
                f"an attention worker's --rank must be in 0..{self.afd_attention_ratio - 1}"
            )
        if self.disaggregation_mode == "ffn" and self.rank != self.afd_attention_ratio:
            raise UserInputError(f"the FFN worker's --rank must be {self.afd_attention_ratio} (r)")
        if not self.afd_ffn_endpoint.startswith(("tcp://", "ipc://")):
            raise UserInputError(
                f"--afd-ffn-endpoint must be a tcp:// or ipc:// address, got {self.afd_ffn_endpoint!r}"
            )
        if self.afd_microbatches < 1 or self.afd_microbatch_size < 0:
            raise UserInputError("--afd-microbatches must be >= 1 and --afd-microbatch-size >= 0")
        if not self.afd_sync_timeout_ms > 0:
            raise UserInputError(
                f"--afd-sync-timeout-ms must be > 0, got {self.afd_sync_timeout_ms}"
            )
        if self.threads < 1:
            raise UserInputError(f"--threads must be >= 1, got {self.threads}")
        if not self.front_timeout_s >= 0:
            raise UserInputError(f"--front-timeout-s must be >= 0, got {self.front_timeout_s}")
        if self.host and not re.fullmatch(r"[A-Za-z0-9._:-]+", self.host):
            raise UserInputError(
                f"--host must be a host name or IP address (no scheme or port), got {self.host!r}"
            )
        try:
            check_device(self.device)
        except UserInputError as exc:
            raise UserInputError(f"--{exc}") from None

    @property
    def world_size(self) -> int:
        return self.afd_attention_ratio + 1

    @property
    def sync_timeout_s(self) -> float:
        return self.afd_sync_timeout_ms / 1000.0


def fingerprint(model_path: str, config: Any, dtype: Any, batch_invariant: bool = False):
    """What two workers must agree on to serve one model together (a messages.Fingerprint)."""
    from afdserve.launch.messages import Fingerprint

    return Fingerprint(
        model=os.path.basename(os.path.normpath(str(model_path))),
        architecture=config.architecture,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        dtype=str(dtype).replace("torch.", ""),
        batch_invariant=bool(batch_invariant),
    )


def _kernels(cfg: WorkerConfig):  # -> Kernels (imported late: torch loads after setup)
    from afdserve.model.kernels import Kernels

    return Kernels(batch_invariant=bool(cfg.batch_invariant))


def _setup_process(cfg: WorkerConfig) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    if cfg.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in cfg.cpus.split(",") if c != ""})
        except (OSError, ValueError) as exc:
            log.warning("cannot pin to cpus %r: %s", cfg.cpus, exc)
    if sys.platform.startswith("linux"):  # die with the parent: no orphans if the front is killed
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _use_device(device: str) -> None:
    """Make `device` (checked by load_model) the current CUDA device: NIXL's VRAM slots and the
    transport's threads use the current one."""
    if device != "cpu":
        import torch

        torch.cuda.set_device(torch.device(device).index or 0)  # "cuda" alone means cuda:0


def _install_stop(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_worker(cfg: WorkerConfig) -> int:
    import zmq

    logging.basicConfig(
        level=logging.WARNING,
        format=f"[{cfg.disaggregation_mode}{cfg.rank}] %(levelname)s %(message)s",
    )
    _setup_process(cfg)
    stop = threading.Event()
    _install_stop(stop)
    ctx = zmq.Context()
    events = ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    if cfg.events:
        events.connect(cfg.events)
    try:
        if cfg.disaggregation_mode == "ffn":
            return _run_ffn(cfg, ctx, events, stop)
        return _run_attention(cfg, ctx, events, stop)
    except UserInputError as exc:
        _report(events, cfg, f"{exc}", fatal=True)
        print(f"afdserve worker: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # report, then die loudly: the front turns it into a clear error
        _report(events, cfg, f"{type(exc).__name__}: {exc}", fatal=True)
        raise
    finally:
        events.close()
        ctx.term()


FRONT_GONE = 4
"""Exit code of a worker whose front fell silent."""


class _FrontWatch:
    """Whether the front is gone: silent for `timeout_s` since its last message (the clock
    starts at its first one, so a worker started before its front waits for it)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last: float | None = None

    def heard(self, messages: list) -> None:
        if messages:
            self.last = time.monotonic()

    def gone(self, cfg: WorkerConfig) -> bool:
        if not self.timeout_s or self.last is None:
            return False
        silent = time.monotonic() - self.last
        if silent <= self.timeout_s:
            return False
        log.error(
            "the front (%s) sent nothing for %.0fs (limit %.0fs): it is gone; exiting",
            cfg.control,
            silent,
            self.timeout_s,
        )
        return True


def _report(
    events: Any, cfg: WorkerConfig, message: str, fatal: bool, request_id: str | None = None
) -> None:
    """Tell the front about an error (best effort: a front that does not listen is gone)."""
    from afdserve.launch import control
    from afdserve.launch.messages import Failed

    msg = Failed(cfg.rank, cfg.disaggregation_mode, message, fatal, request_id)  # type: ignore[arg-type]
    try:
        control.send(events, msg, timeout_s=1.0)
    except TimeoutError:
        pass


def _create_transport(cfg: WorkerConfig):
    from afdserve.transport.options import afd_peers
    from afdserve.transport.registry import create_transport

    # nixl moves GPU memory itself: a GPU worker registers VRAM slots (no host staging)
    backend: dict[str, str] = {}
    if cfg.transport == "nixl" and cfg.device != "cpu":
        backend["device"] = "cuda"
    if cfg.host and cfg.transport == "tcp":  # several hosts: bind where peers can dial
        backend["bind_host"] = cfg.host
    if cfg.host and cfg.transport == "torch":
        backend["gloo_host"] = cfg.host
    return create_transport(
        cfg.transport,
        cfg.rank,
        cfg.world_size,
        rendezvous=cfg.rendezvous,
        peers=afd_peers(cfg.rank, cfg.afd_attention_ratio),
        connect_timeout_s=cfg.connect_timeout_s,
        **backend,
    )


# -- FFN worker ---------------------------------------------------------------------------------


def _run_ffn(cfg: WorkerConfig, ctx: Any, events: Any, stop: threading.Event) -> int:
    import zmq

    from afdserve.afd.ffn_worker import FFNWorker
    from afdserve.launch import control
    from afdserve.launch.local import load_model
    from afdserve.launch.messages import Heartbeat, Ready, Shutdown

    model = load_model(cfg.model, cfg.dtype, cfg.device, parts=("ffn",), kernels=_kernels(cfg))
    _use_device(cfg.device)
    mine = fingerprint(model.path, model.config, model.dtype, bool(cfg.batch_invariant))
    _handshake_as_ffn(cfg, ctx, mine)
    transport = _create_transport(cfg)
    commands = ctx.socket(zmq.PULL)
    if cfg.control:
        commands.connect(cfg.control)
    try:
        gather = None if cfg.afd_gather_wait_ms < 0 else cfg.afd_gather_wait_ms / 1000.0
        worker = FFNWorker(
            model.ffn, transport, range(cfg.afd_attention_ratio), cfg.sync_timeout_s, gather
        )
        control.send(events, Ready(cfg.rank, "ffn", os.getpid(), mine))
        last_beat = 0.0
        front = _FrontWatch(cfg.front_timeout_s)
        while not stop.is_set():  # the FFN worker's loop
            worker.serve_once(0.05)
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                msgs = control.recv_all(commands, 0, control.TO_WORKER)
                front.heard(msgs)
                if any(isinstance(m, Shutdown) for m in msgs):
                    break
                if front.gone(cfg):
                    return FRONT_GONE
                beat = Heartbeat(cfg.rank, "ffn", afd=worker.stats.snapshot().to_dict())
                control.send(events, beat, timeout_s=1.0)
        return 0
    finally:
        transport.close()
        commands.close(linger=0)


def _handshake_as_ffn(cfg: WorkerConfig, ctx: Any, mine: dict[str, Any]) -> None:
    """Answer every attention worker's hello; refuse (and fail) on any mismatch."""
    import zmq

    from afdserve.launch import control
    from afdserve.launch.messages import SCHEMA_VERSION, Hello, Refuse, Welcome, encode

    rep = ctx.socket(zmq.REP)
    rep.bind(cfg.afd_ffn_endpoint)
    deadline = time.monotonic() + cfg.connect_timeout_s
    seen: set[int] = set()
    try:
        while len(seen) < cfg.afd_attention_ratio:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not rep.poll(int(remaining * 1000)):
                missing = sorted(set(range(cfg.afd_attention_ratio)) - seen)
                raise TimeoutError(
                    f"FFN handshake: no hello from attention rank(s) {missing} within {cfg.connect_timeout_s}s"
                )
            msg = control.HANDSHAKE.decode(rep.recv())
            if not isinstance(msg, Hello):
                rep.send(encode(Refuse("expected a hello message")))
                continue
            rank, diff = msg.rank, mine.differences(msg.fingerprint)
            if msg.schema != SCHEMA_VERSION:
                reason = (
                    f"attention rank {rank} speaks control schema {msg.schema}, the FFN worker "
                    f"{SCHEMA_VERSION}: run one afdserve version in a group"
                )
            elif diff:
                reason = f"attention rank {rank} does not match the FFN worker: " + ", ".join(
                    f"{k} {a!r} (ffn) != {b!r} (attention)" for k, (a, b) in diff.items()
                )
            elif not 0 <= rank < cfg.afd_attention_ratio:
                reason = f"bad rank {rank!r}"
            else:
                seen.add(rank)
                rep.send(encode(Welcome(cfg.rank)))
                continue
            rep.send(encode(Refuse(reason)))
            raise UserInputError(reason)
    finally:
        rep.close(linger=500)


# -- attention worker ---------------------------------------------------------------------------


def _handshake_as_attention(cfg: WorkerConfig, ctx: Any, mine: dict[str, Any]) -> None:
    import zmq

    from afdserve.launch import control
    from afdserve.launch.messages import Hello, Refuse, Welcome, encode

    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(cfg.afd_ffn_endpoint)
    try:
        req.send(encode(Hello(cfg.rank, mine)))
        if not req.poll(int(cfg.connect_timeout_s * 1000)):
            raise TimeoutError(
                f"no answer from the FFN worker at {cfg.afd_ffn_endpoint} within {cfg.connect_timeout_s}s"
            )
        reply = control.HANDSHAKE.decode(req.recv())
        if not isinstance(reply, Welcome):
            why = reply.reason if isinstance(reply, Refuse) else f"a malformed answer ({reply})"
            raise UserInputError(f"the FFN worker refused this attention worker: {why}")
    finally:
        req.close()


def _run_attention(cfg: WorkerConfig, ctx: Any, events: Any, stop: threading.Event) -> int:
    import zmq

    from afdserve.afd.attention_runner import AttentionRunner
    from afdserve.afd.ffn_link import RemoteFFN, result_timeout_s
    from afdserve.config import EngineConfig
    from afdserve.engine.kv_cache import KVCache
    from afdserve.engine.scheduler import Scheduler
    from afdserve.launch import control
    from afdserve.launch.local import cache_and_scheduler_configs, load_model
    from afdserve.launch.messages import Heartbeat, Ready, Shutdown, StepOutputs

    model = load_model(
        cfg.model, cfg.dtype, cfg.device, parts=("attention",), kernels=_kernels(cfg)
    )
    _use_device(cfg.device)
    mine = fingerprint(model.path, model.config, model.dtype, bool(cfg.batch_invariant))
    _handshake_as_attention(cfg, ctx, mine)
    ecfg = EngineConfig(
        model=cfg.model,
        block_size=cfg.block_size,
        num_kv_blocks=cfg.num_kv_blocks or None,
        kv_cache_gib=cfg.kv_cache_gib,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len or None,
    )
    cache_cfg, sched_cfg = cache_and_scheduler_configs(ecfg, model.config, model.dtype)
    transport = _create_transport(cfg)
    requests = ctx.socket(zmq.PULL)
    if cfg.control:
        requests.connect(cfg.control)
    try:
        scheduler = Scheduler(sched_cfg, cache_cfg, eos_token_ids=model.config.eos_token_ids)
        kv = KVCache(
            model.config, cache_cfg.num_blocks, cache_cfg.block_size, model.dtype, cfg.device
        )
        link = RemoteFFN(
            transport,
            ffn_rank=cfg.afd_attention_ratio,
            timeout_s=result_timeout_s(cfg.sync_timeout_s),
            device=cfg.device,
        )
        shipper = _StatsShipper(link.stats)
        runner = AttentionRunner(
            model.attention, kv, link, cfg.afd_microbatches, cfg.afd_microbatch_size or None
        )
        ready = Ready(
            cfg.rank, "attention", os.getpid(), mine, max_model_len=scheduler.max_model_len
        )
        control.send(events, ready)
        step, last_beat = 0, time.monotonic()
        front = _FrontWatch(cfg.front_timeout_s)
        while not stop.is_set():  # the attention worker's loop
            idle = not scheduler.has_unfinished()
            msgs = control.recv_all(requests, HEARTBEAT_S if idle else 0, control.TO_WORKER)
            front.heard(msgs)
            for m in msgs:
                if isinstance(m, Shutdown):
                    return 0
                _apply(m, scheduler, events, cfg)
            if front.gone(cfg):
                return FRONT_GONE
            if not scheduler.has_unfinished():
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    last_beat = time.monotonic()
                    status, afd = _attention_status(scheduler), shipper.take(force=True)
                    beat = Heartbeat(cfg.rank, "attention", status, afd)
                    control.send(events, beat, timeout_s=1.0)
                continue
            plan = scheduler.schedule()
            if plan.is_empty:
                continue
            t0 = time.perf_counter()
            result = runner.execute(plan, step)
            shipper.stats.add_active(time.perf_counter() - t0)  # as the in-process Engine does
            step += 1
            evs = scheduler.update(plan, result)
            afd = shipper.take(force=not scheduler.has_unfinished())  # final stats at once
            control.send(
                events, StepOutputs(cfg.rank, _attention_status(scheduler), tuple(evs), afd)
            )
        return 0
    finally:
        transport.close()
        requests.close(linger=0)


def _attention_status(scheduler: Any):  # -> messages.AttentionStatus
    """The queues, KV blocks and counters sent with every step's outputs and heartbeat."""
    from afdserve.launch.messages import AttentionStatus

    load = scheduler.load()
    return AttentionStatus(
        load=load.score,
        kv_usage=scheduler.kv_usage,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        counters=scheduler.counters,  # encoded at once by control.send: no copy needed
    )


class _StatsShipper:
    """The recorder's snapshot (as `to_dict`) for a status message, at most every STATS_EVERY_S
    unless forced, else None: a snapshot copies a few histograms, too much for every step."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self._last = float("-inf")

    def take(self, force: bool = False) -> dict[str, Any] | None:
        now = time.monotonic()
        if not force and now - self._last < STATS_EVERY_S:
            return None
        self._last = now
        return self.stats.snapshot().to_dict()


def _apply(m: Any, scheduler: Any, events: Any, cfg: WorkerConfig) -> None:
    """One front message to the scheduler. A request the scheduler refuses, or an add that did
    not decode, is answered with a non-fatal `Failed` naming it: the worker keeps serving and
    the front does not wait for that request forever."""
    from afdserve.launch.messages import Abort, AddRequest, Malformed
    from afdserve.types import Request

    try:
        if isinstance(m, AddRequest):
            request = Request(m.request_id, m.prompt, m.params, time.monotonic(), m.seed)
            scheduler.add_request(request)
        elif isinstance(m, Abort):
            scheduler.abort_request(m.request_id)
        elif isinstance(m, Malformed) and m.request_id is not None:
            _report(events, cfg, f"malformed request: {m.error}", False, m.request_id)
    except (UserInputError, TypeError, ValueError) as exc:  # never kills the worker
        _report(events, cfg, str(exc), False, getattr(m, "request_id", None))


def config_from_args(args: Any) -> WorkerConfig:
    fields = {f.name for f in dataclasses.fields(WorkerConfig)}
    return WorkerConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
