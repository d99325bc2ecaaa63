"""Multi-process AFD on one host: the front side of r attention worker processes and one FFN
worker process, with the same interface as the in-process `Engine` (add_request, abort, step,
has_unfinished, close), so `LLM` and the server run over either.

The front spawns `afdserve worker` processes, waits until every one reports ready (which each
does only after the attention/FFN handshake and the data transport are up), routes each request
to the attention worker with the least outstanding tokens, and collects token events from all
workers. It never waits without a deadline: a worker that dies or reports a fatal error is a
`WorkerError` within a bounded time, and `close()` leaves no processes behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from afdserve.afd.router import Router
from afdserve.config import EngineConfig
from afdserve.errors import AfdserveError, UserInputError
from afdserve.launch import control
from afdserve.types import FinishReason, SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class WorkerError(AfdserveError):
    """A worker process died, failed to start, or reported a fatal error."""


@dataclass
class _RemoteWorker:
    """The front's view of one attention worker process."""

    rank: int
    outstanding: dict[str, int] = field(default_factory=dict)
    """request id -> tokens it holds or will hold (prompt + generated so far)."""
    kv_usage: float = 0.0

    def load_score(self) -> int:
        return sum(self.outstanding.values())


class MultiProcessEngine:
    def __init__(self, cfg: EngineConfig, startup_timeout_s: float = 120.0) -> None:
        if not cfg.is_afd:
            raise UserInputError(
                "multi-process serving runs AFD: use mode='afd' (aggregated runs in-process)"
            )
        from afdserve.model.builtin import resolve_model
        from afdserve.model.config import ModelConfig

        self.cfg = cfg
        self.model_path = resolve_model(cfg.model)
        self.model_config = ModelConfig.from_dir(self.model_path)
        self.vocab_size = self.model_config.vocab_size
        r = cfg.attention_workers
        self.workers = [_RemoteWorker(k) for k in range(r)]
        self.router = Router(self.workers)
        self._rng = random.Random(cfg.seed)
        self._owner: dict[str, int] = {}
        self._closed = False
        self._ctx = zmq.Context()
        self._events = self._ctx.socket(zmq.PULL)
        events_addr = f"tcp://127.0.0.1:{self._events.bind_to_random_port('tcp://127.0.0.1')}"
        self._controls: list[zmq.Socket] = []
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        self._logdir = tempfile.mkdtemp(prefix="afdserve-workers-")
        self.max_model_len = 0
        ffn_endpoint = f"tcp://127.0.0.1:{control.free_port()}"
        rendezvous = f"127.0.0.1:{control.free_port()}"
        ncpu = os.cpu_count() or 1
        try:
            for rank in range(r + 1):
                ctrl = self._ctx.socket(zmq.PUSH)
                ctrl.setsockopt(zmq.LINGER, 0)
                ctrl_addr = f"tcp://127.0.0.1:{ctrl.bind_to_random_port('tcp://127.0.0.1')}"
                self._controls.append(ctrl)
                args = _worker_args(
                    cfg,
                    self.model_path,
                    rank,
                    ffn_endpoint,
                    rendezvous,
                    ctrl_addr,
                    events_addr,
                    cpus=str(rank % ncpu) if cfg.pin_workers else "",
                )
                log_path = Path(self._logdir) / f"worker-{rank}.log"
                self._logs.append(log_path)
                with open(log_path, "wb") as logf:
                    self._procs.append(
                        subprocess.Popen(
                            args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                        )
                    )
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- start-up ---------------------------------------------------------------------------

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        while len(ready) < len(self._procs):
            self._check_alive(starting=True)
            if time.monotonic() > deadline:
                missing = sorted(set(range(len(self._procs))) - ready)
                raise WorkerError(
                    f"workers {missing} not ready within {timeout_s:.0f}s; logs: {self._logdir}"
                )
            for m in control.recv_all(self._events, 0.1):
                if m["op"] == "ready":
                    ready.add(int(m["rank"]))
                    if m.get("role") == "attention":
                        self.max_model_len = int(m["max_model_len"])
                elif m["op"] == "error":
                    raise WorkerError(f"worker {m.get('rank')} failed to start: {m.get('message')}")

    def _check_alive(self, starting: bool = False) -> None:
        for rank, p in enumerate(self._procs):
            code = p.poll()
            if code is not None and not self._closed:
                tail = _tail(self._logs[rank])
                what = "failed to start" if starting else "died"
                raise WorkerError(f"worker rank {rank} {what} (exit code {code}): {tail}")

    # -- the Engine interface ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> int:
        ids = list(prompt_token_ids)
        if not ids:
            raise UserInputError("prompt must not be empty")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise UserInputError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(ids) > self.max_model_len:
            raise UserInputError(
                f"prompt has {len(ids)} tokens but the context length is {self.max_model_len}"
            )
        if request_id in self._owner:
            raise UserInputError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        k = self.router.choose()
        control.send(
            self._controls[k],
            "add",
            id=request_id,
            prompt=ids,
            params=dataclasses.asdict(params),
            seed=seed,
        )
        self._owner[request_id] = k
        self.workers[k].outstanding[request_id] = len(ids)
        return k

    def abort(self, request_id: str) -> bool:
        k = self._owner.pop(request_id, None)
        if k is None:
            return False
        self.workers[k].outstanding.pop(request_id, None)
        control.send(self._controls[k], "abort", id=request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._owner)

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """Token events that arrived within `timeout_s` (raises WorkerError if a worker failed)."""
        self._check_alive()
        out: list[TokenEvent] = []
        for m in control.recv_all(self._events, timeout_s):
            if m["op"] == "events":
                w = self.workers[int(m["rank"])]
                w.kv_usage = float(m.get("kv_usage", 0.0))
                for rid, tok, finished, reason, logprob in m["events"]:
                    if rid not in self._owner:
                        continue  # aborted meanwhile
                    w.outstanding[rid] = w.outstanding.get(rid, 0) + 1
                    if finished:
                        self._owner.pop(rid, None)
                        w.outstanding.pop(rid, None)
                    out.append(
                        TokenEvent(
                            rid,
                            int(tok),
                            bool(finished),
                            FinishReason(reason) if reason else None,
                            logprob,
                        )
                    )
            elif m["op"] == "error":
                if m.get("fatal"):
                    raise WorkerError(f"{m.get('role')} worker {m.get('rank')}: {m.get('message')}")
                rid = m.get("request_id")
                if rid in self._owner:
                    log.warning(
                        "request %s failed on worker %s: %s", rid, m.get("rank"), m.get("message")
                    )
                    self.workers[self._owner.pop(rid)].outstanding.pop(rid, None)
                    out.append(TokenEvent(rid, -1, True, FinishReason.ABORT))
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (shutdown message, then SIGTERM, then SIGKILL) and free sockets."""
        if self._closed:
            return
        self._closed = True
        for ctrl in self._controls:
            try:
                control.send(ctrl, "shutdown", timeout_s=0.2)
            except (TimeoutError, zmq.ZMQError):
                pass
        deadline = time.monotonic() + timeout_s / 2
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for s in [*self._controls, self._events]:
            s.close(linger=0)
        self._ctx.term()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __del__(self) -> None:  # last resort: never leave workers behind
        if not getattr(self, "_closed", True):
            for p in getattr(self, "_procs", []):
                p.kill()


def _worker_args(
    cfg: EngineConfig,
    model: Path,
    rank: int,
    ffn_endpoint: str,
    rendezvous: str,
    ctrl: str,
    events: str,
    cpus: str,
) -> list[str]:
    r = cfg.attention_workers
    args = [
        sys.executable,
        "-m",
        "afdserve.cli",
        "worker",
        "--disaggregation-mode",
        "ffn" if rank == r else "attention",
        "--model",
        str(model),
        "--afd-attention-ratio",
        str(r),
        "--afd-ffn-endpoint",
        ffn_endpoint,
        "--transport",
        cfg.transport,
        "--rendezvous",
        rendezvous,
        "--rank",
        str(rank),
        "--afd-microbatches",
        str(cfg.microbatches),
        "--afd-microbatch-size",
        str(cfg.microbatch_tokens or 0),
        "--afd-sync-timeout-ms",
        str(int(cfg.sync_timeout_s * 1000)),
        "--control",
        ctrl,
        "--events",
        events,
        "--dtype",
        cfg.dtype,
        "--threads",
        str(cfg.worker_threads),
        "--block-size",
        str(cfg.block_size),
        "--kv-cache-gib",
        str(cfg.kv_cache_gib),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
    ]
    if cfg.num_kv_blocks:
        args += ["--num-kv-blocks", str(cfg.num_kv_blocks)]
    if cfg.max_model_len:
        args += ["--max-model-len", str(cfg.max_model_len)]
    if cpus:
        args += ["--cpus", cpus]
    return args


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    errors = [ln for ln in text if "error" in ln.lower()]
    return " | ".join((errors or text)[-lines:]) or "(empty log)"


def engine_kind(cfg: EngineConfig) -> str:
    return "multiprocess" if cfg.transport != "local" else "local"


__all__ = ["MultiProcessEngine", "WorkerError", "engine_kind"]
