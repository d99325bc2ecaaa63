"""Multi-process AFD: the front of r attention worker processes and one FFN worker process, an
`EngineClient` (launch/client.py) like the in-process `Engine`, so `LLM` and the server run
over either.

The front spawns `afdserve worker` processes (launch/processes.py; or, with `cfg.front`, binds
known addresses and waits for workers started by hand, possibly on other hosts), hosts the
data transport's rendezvous store, sends each worker its `Configure` as it connects, waits
until every one reports ready (after loading its part and connecting the data transport)
serving the front's model, admits and routes each request to the attention worker with the
least outstanding tokens, and collects token events from all workers. It pings every worker
each second from its start, so a worker can tell when its front is gone. It never waits
without a deadline: a worker that dies or reports a fatal error is a `WorkerError` within a
bounded time, and `close()` leaves no processes behind.

What `state()` reports comes from the workers' own messages: every events message and
heartbeat of an attention worker carries its queues, KV blocks and scheduler counters, and
(at most every 0.5 s, and on every heartbeat) its FFN link's AFD stats; the FFN worker's
heartbeats carry its AFD stats. The front keeps the latest of each, so the metrics lag the
workers by at most one report. Requests sent but not yet taken in by a worker count as waiting
(the front knows how many it sent; the worker reports how many it added), so admission control
sees a flood at once, not one report later.

Threads: the server calls `add_request`/`abort`/`state`/`healthy` on its event loop while
`step` runs on its engine thread. Every shared dict and every control socket is used under
`self._lock` (ZeroMQ sockets are not thread-safe); the events socket is only read by the
thread that steps (`step`, `poll_idle`), under `self._recv_lock`, which `close` also takes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import threading
import time
import weakref
from pathlib import Path

import zmq

from afdserve.afd.admission import admit
from afdserve.afd.router import Router
from afdserve.afd.stats import AFDStatsSnapshot, EngineState, ExpertLoadState, WorkerState
from afdserve.config import EngineConfig
from afdserve.eplb.controller import EPLBController
from afdserve.eplb.initial import initial_placement
from afdserve.errors import AfdserveError, StateConflict, UserInputError
from afdserve.launch import control
from afdserve.launch.drain import Drained
from afdserve.launch.failover import FFNFailover
from afdserve.launch.messages import (
    SCHEMA_VERSION,
    Abort,
    AddRequest,
    Configure,
    Failed,
    Fingerprint,
    Heartbeat,
    Hello,
    Joining,
    Ping,
    Ready,
    Rejoin,
    Shutdown,
    StepOutputs,
)
from afdserve.launch.processes import WorkerProcesses, reap
from afdserve.launch.remote_worker import RemoteWorker, Tracked, mismatch
from afdserve.launch.replacement import TwoPhaseSwitch
from afdserve.model.config import ModelConfig
from afdserve.transport.options import free_port
from afdserve.types import FinishReason, SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class WorkerError(AfdserveError):
    """A worker process died, failed to start, reported a fatal error, or fell silent."""


STALL_S = 1.5
"""A worker that has sent nothing for this long is stalled (stopped, wedged, or its host gone):
every worker pulses every `worker.PULSE_S` (0.5 s) from a thread of its own, whatever its loop
is doing, so three missed pulses mean it is not running. A stalled attention worker's requests
move to the others at once; a stalled FFN worker makes the group degraded (the attention workers
wait for it, bounded by their result timeout)."""

SILENCE_MARGIN_S = 10.0

WEDGED_S = 2 * STALL_S
"""A spawned FFN worker silent this long, when the FFN failover can take its experts, is
declared wedged: the front kills it (SIGKILL), so the survivors serve its experts and it is
started again, instead of the attention workers waiting for it up to their result timeout."""


def silence_limit_s(sync_timeout_s: float) -> float:
    """How long requests with no attention worker to serve them (every one stalled) wait for
    one to come back before they end with an error: the longest an attention worker's own wait
    for an FFN result lasts (`result_timeout_s`), plus a margin."""
    from afdserve.afd.ffn_link import result_timeout_s

    return result_timeout_s(sync_timeout_s) + SILENCE_MARGIN_S


RESTARTABLE = ("shm", "tcp", "torch")
"""Transports whose endpoints can connect again under a new epoch (a restarted FFN worker);
nixl's agents have not been tried that way (no nixl here to test it)."""

FAILOVER_TRANSPORTS = ("shm", "tcp")
"""Transports whose data plane can leave a dead FFN rank out (`TransportOptions.peers`), which
an FFN failover needs; torch's process group takes every rank of the world."""

MOVE_SEP = "\x1f"
"""Between a request's id and its move count in the id it has on a worker after a move (an
id of a request must not hold it)."""

PARKED = -1


def restart_backoff_s(n: int) -> float:
    """How long the front waits before the n-th restart of a dead worker starts its process:
    the first at once (a lone crash costs no more than the model load), then 1, 2, 4 and at most
    8 s, so a worker that dies at every start does not spin through the budget."""
    return 0.0 if n <= 1 else min(2.0 ** (n - 2), 8.0)


"""The owner of a request that no attention worker can serve now (all stalled)."""

EMPTY_SLOT = "empty slot"
"""What an attention slot with no worker is down for (never reported as a problem)."""

RELEASE_TIMEOUT_S = 10.0
"""Longest a removed spawned attention worker may take to exit after its `Shutdown` before it
is killed."""

REJOIN_SETTLE_S = 1.0
"""A worker started again (by hand, or by a launcher such as torchrun's elastic agent, which
restarts every process of its node together and, under a c10d rendezvous, of every node) is
taken back once no other one has said hello for this long: the workers restarted at one moment
join under one epoch, instead of each new hello moving the others to yet another one while they
connect."""
REJOIN_SETTLE_MAX_S = 5.0
"""...but no later than this after the first of them said hello."""

ADD_TIMEOUT_S = 1.0
"""Longest a control message to a live worker may wait to be taken (ZeroMQ queues them, so in
practice they never wait); aborts wait less, as they run on the server's event loop."""
ABORT_TIMEOUT_S = 0.2


class MultiProcessEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        if not cfg.is_afd:
            raise UserInputError(
                "multi-process serving runs AFD: use mode='afd' (aggregated runs in-process)"
            )
        from afdserve.model.builtin import resolve_model

        self.cfg = cfg
        self.model_path = resolve_model(cfg.model)
        self.model_config = ModelConfig.from_dir(self.model_path)
        self.vocab_size = self.model_config.vocab_size
        r = cfg.attention_slots
        self.workers = [RemoteWorker(k) for k in range(r)]
        self._members = set(range(cfg.attention_workers))
        """Attention slots with a worker (started, serving, or joining): the group starts with
        ranks 0..attention_workers-1; `add_worker` and a hand-started worker of a free slot
        join, `remove_worker` leaves. Every other slot is empty: down, and not in the data
        plane (the FFN workers do not connect to it, so nothing ever waits for it)."""
        self._adding: set[int] = set()
        """Members added at run time that have not said `Ready` yet (a failed join frees the
        slot rather than failing the group)."""
        for w in self.workers[cfg.attention_workers :]:
            w.down, w.dead = EMPTY_SLOT, True
        self.router = Router(self.workers, cfg.block_size if cfg.enable_prefix_caching else 0)
        self._rng = random.Random(cfg.seed)
        self._owner: dict[str, int] = {}
        """request id -> the attention worker serving it (PARKED while none can)."""
        self._tracked: dict[str, Tracked] = {}
        """What each request's replay on another attention worker needs (a migration)."""
        self._wire: dict[str, str] = {}
        """The worker-side id of each request that moved (`_wire_id`) -> its own id."""
        self._parked: set[str] = set()
        """Requests no attention worker can take now (owner PARKED)."""
        self._parked_since: float | None = None
        """When requests started waiting for any attention worker to serve them."""
        self._drained = Drained(r)
        """Attention workers an operator drained (launch/drain.py)."""
        self.requests_migrated = 0
        """Moves of a request to another attention worker because its own died or stalled."""
        self._ffn_heard = {j: time.monotonic() for j in cfg.ffn_ranks}
        self._transport_key = secrets.token_bytes(32)
        """The group's key: tcp data connections prove it at their handshake, so a frame from
        anyone without it is dropped (sent in `Configure` over the control sockets)."""
        self._epoch = 0
        """The data plane's incarnation: one more at every FFN restart (`Rejoin`)."""
        self._restarting: dict[int, tuple[str, float]] = {}
        """rank -> (why it was restarted, the deadline of its `Ready`)."""
        self._respawn_due: dict[int, float] = {}
        """rank -> when its restart starts its process (the backoff)."""
        self._hellos: dict[int, str] = {}
        """rank -> why: workers started again that said hello, waiting for the others restarted
        with them (REJOIN_SETTLE_S) before they are taken back together."""
        self._hellos_first = self._hellos_last = 0.0
        self._abandoned: set[int] = set()
        """Attention ranks that died with no restart left: gone for good."""
        self.restarts = 0
        """FFN workers started again after they died."""
        self._configured_at = 0.0
        self._fingerprint: Fingerprint | None = None
        """The model fingerprint every worker reported (a restarted one must match it)."""
        self._pending: list[TokenEvent] = []
        """Token events `poll_idle` received; the next `step` returns them."""
        self._ffn_afd = {j: AFDStatsSnapshot() for j in cfg.ffn_ranks}
        """The latest AFD stats each FFN rank reported."""
        self.placement = initial_placement(cfg.ffn_workers, self.model_config)
        """Where each MoE layer's experts start (expert parallelism), told to every worker."""
        self.switch: TwoPhaseSwitch | None = None
        """Expert parallelism: expert load counts and EPLB's re-placements (replacement.py)."""
        if self.placement is not None:
            self.switch = TwoPhaseSwitch(
                EPLBController(cfg, self.placement),
                sorted(self._members),
                cfg.ffn_ranks,
                self._send_control,
                timeout_s=max(60.0, cfg.startup_timeout_s),
            )
        self.failover: FFNFailover | None = None
        """m > 1 on an MoE model: survivors take a dead FFN worker's experts (failover.py)."""
        if self.switch is not None and cfg.ffn_failover and cfg.transport in FAILOVER_TRANSPORTS:
            self.failover = FFNFailover(
                self.switch,
                self._send_control,
                timeout_s=max(30.0, cfg.startup_timeout_s),
                max_experts=cfg.ffn_failover_max_experts,
            )
        self._absent: set[int] = set()
        """FFN ranks out of the data plane now (failed over, until their restart joins)."""
        self._join_wait: dict[int, int] = {}
        """Restarted FFN rank -> the epoch at which the others rejoin the data plane with it,
        once it says `Joining` (its part loaded): the survivors serve until then."""
        self._failure: str | None = None
        """Why the engine cannot serve any more (a worker died or reported a fatal error)."""
        self._lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._closed = False
        self._ctx = zmq.Context()
        self._events = self._ctx.socket(zmq.PULL)
        self._controls: list[zmq.Socket] = []
        self._procs = WorkerProcesses()
        """The workers this front spawned (none when they were started by hand)."""
        self.max_model_len = 0
        self.rendezvous = ""
        """HOST:PORT of the data transport's rendezvous store, which this front hosts (for shm,
        only the name its session is derived from)."""
        self._store = None
        self._stop_pings = threading.Event()
        self._pinger = threading.Thread(
            target=_ping_loop,
            args=(weakref.ref(self), self._stop_pings),
            name="afd-front-ping",
            daemon=True,
        )
        try:
            if cfg.front:
                self._bind_front()
            else:
                self._spawn_workers()
            if cfg.transport != "shm":
                from afdserve.transport.rendezvous import StoreServer

                self._store = StoreServer(self.rendezvous, cfg.world_size, cfg.startup_timeout_s)
            self._pinger.start()  # from the start: a ready worker must not think us gone
            self._wait_ready(cfg.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _ping_all(self) -> None:
        with self._lock:
            if self._closed:
                return
            for ctrl in self._controls:
                try:
                    control.send(ctrl, Ping(), timeout_s=0.0)
                except (TimeoutError, zmq.ZMQError):
                    pass  # a dead or busy worker: its queue is full; nothing to do here

    # -- start-up ---------------------------------------------------------------------------

    def _bind_front(self) -> None:
        """Workers started by hand: bind the addresses they were told (`cfg.front`)."""
        events_addr, control_addrs, self.rendezvous = self.cfg.front_addresses
        for sock, addr in [(self._events, events_addr)] + [
            (self._new_control(), a) for a in control_addrs
        ]:
            try:
                sock.bind(addr)
            except zmq.ZMQError as exc:
                raise UserInputError(f"the front cannot bind {addr}: {exc}") from None
        r = self.cfg.attention_slots
        ranks = ", ".join(
            f"rank {k}{' (FFN)' if k >= r else ''}{'' if k >= r or k in self._members else ' (free slot)'} {a}"
            for k, a in enumerate(control_addrs)
        )
        log.warning(
            "afdserve front: waiting up to %.0fs for %d attention and %d FFN workers, "
            "started with `afdserve worker --front %s --rank K`: %s",
            self.cfg.startup_timeout_s,
            r,
            self.cfg.ffn_workers,
            self.cfg.front,
            ranks,
        )

    def _new_control(self) -> zmq.Socket:
        ctrl = self._ctx.socket(zmq.PUSH)
        ctrl.setsockopt(zmq.LINGER, 0)
        self._controls.append(ctrl)
        return ctrl

    def _spawn_workers(self) -> None:
        """Start every worker on this host, on loopback addresses the front picks; each is told
        only where the front is, its rank (which `ps` then shows) and its cores; the rest
        comes in `Configure`."""
        events = f"tcp://127.0.0.1:{self._events.bind_to_random_port('tcp://127.0.0.1')}"
        self.rendezvous = f"127.0.0.1:{free_port()}"
        controls = []
        for _ in range(self.cfg.world_size):
            port = self._new_control().bind_to_random_port("tcp://127.0.0.1")
            controls.append(f"tcp://127.0.0.1:{port}")
        self._procs.spawn(self.cfg, events, controls, self._members | set(self.cfg.ffn_ranks))

    def _configure(self, pending: set[int]) -> None:
        """Send `Configure` to each rank in `pending` whose worker has connected (a PUSH socket
        takes a message only once its peer is there); those sent leave `pending`."""
        with self._lock:
            self._configure_locked(pending)

    def _configure_locked(self, pending: set[int]) -> None:
        placement = self.placement
        if self.switch is not None:
            placement = self.switch.controller.placement  # EPLB's latest, for a restart
        for rank in sorted(pending):
            msg = Configure(
                rank,
                self.cfg,
                str(self.model_path),
                self.rendezvous,
                placement=None if placement is None else placement.to_dict(),
                epoch=self._epoch,
                absent=tuple(sorted(self._absent - {rank})),
                transport_key=self._transport_key,
                members=self._plane_members(),
            )
            try:
                control.send(self._controls[rank], msg, timeout_s=0.0)
            except (TimeoutError, zmq.ZMQError):
                continue  # not connected yet
            pending.discard(rank)

    def _plane_members(self) -> tuple[int, ...]:
        """The attention ranks the data plane of the current epoch connects (under the lock):
        the members, less those dead and not being started again."""
        return tuple(
            k
            for k in sorted(self._members)
            if not self.workers[k].dead or k in self._restarting or k in self._hellos
        )

    def _wait_ready(self, timeout_s: float) -> None:
        """Configure every rank 0..r+m-1 as it connects, then wait until each has said `ready`
        (after loading its part and connecting the data transport) serving the front's model;
        a worker's start-up error, a death (spawned workers) or the deadline is a WorkerError
        naming the ranks."""
        r, world = self.cfg.attention_slots, self.cfg.world_size
        deadline = time.monotonic() + timeout_s
        starting = self._members | set(self.cfg.ffn_ranks)
        unconfigured = set(starting)
        ready: dict[int, Fingerprint] = {}
        while len(ready) < len(starting):
            self._check_alive(starting=True)
            if time.monotonic() > deadline:
                missing = sorted(starting - set(ready))
                logdir = self._procs.logdir
                where = f"logs: {logdir}" if logdir else f"front {self.cfg.front}"
                raise WorkerError(f"workers {missing} not ready within {timeout_s:.0f}s ({where})")
            if unconfigured:
                self._configure(unconfigured)
            for m in control.recv_all(self._events, 0.1, control.TO_FRONT):
                if isinstance(m, Failed):
                    raise WorkerError(f"worker {m.rank} failed to start: {m.message}")
                if not isinstance(m, Ready) or m.rank not in starting:
                    continue
                if m.role != ("ffn" if m.rank >= r else "attention"):
                    raise WorkerError(
                        f"a {m.role} worker reported ready as rank {m.rank!r}, but this front "
                        f"runs attention ranks 0..{r - 1} and FFN ranks {r}..{world - 1}"
                    )
                if m.schema != SCHEMA_VERSION:
                    raise WorkerError(
                        f"worker rank {m.rank} speaks control schema {m.schema}, this front "
                        f"{SCHEMA_VERSION}: run one afdserve version for the front and workers"
                    )
                self._check_fingerprint(m.rank, m.fingerprint, ready)
                ready[m.rank] = m.fingerprint
                self._fingerprint = m.fingerprint
                if m.role == "attention":
                    self.max_model_len = min(self.max_model_len or m.max_model_len, m.max_model_len)
        for w in self.workers:  # silence counts from here, not from the spawn
            w.last_heard = time.monotonic()
        self._ffn_heard = dict.fromkeys(self._ffn_heard, time.monotonic())

    def _check_fingerprint(
        self, rank: int, theirs: Fingerprint, others: dict[int, Fingerprint]
    ) -> None:
        """Every worker loads the model the front told it, but a host may hold another model
        at that path: a worker must serve the model the front tokenizes for, and all the
        workers of a group the same one (an attention and an FFN part of different models
        would exchange hidden states that mean nothing)."""
        what = mismatch(self.model_config, self.cfg, theirs, others)
        if what:
            raise WorkerError(f"worker rank {rank} serves a different model: {what}")

    def _check_alive(self, starting: bool = False) -> None:
        """While starting, any exit is a WorkerError. Then (under the lock): a worker that
        exited is started again while the restart budget lasts (an attention worker's
        requests move to the others first); past it, an attention worker stays gone and an FFN
        worker's exit is a WorkerError."""
        if self._closed:
            return
        if starting:
            why = self._procs.first_exit(starting)
            if why is not None:
                self._failure = why
                raise WorkerError(why)
            return
        now = time.monotonic()
        for rank, due in list(self._respawn_due.items()):
            if now >= due:
                del self._respawn_due[rank]
                self._procs.respawn(rank)
        for rank, why in self._procs.exits():
            if rank in self._abandoned or rank in self._respawn_due:
                continue
            if rank in self._adding:  # it died before it joined: the slot is free again
                self._join_failed(rank, f"{why}; attention worker {rank} not added")
                continue
            if rank < self.cfg.attention_slots:
                self._lose(rank, why, dead=True)
                self._restart(rank, why)
            elif not self._fail_over(rank, why):
                self._restart(rank, why)
        if self._restarting and time.monotonic() - self._configured_at > 2.0:
            # every 2 s until it is ready: one sent while the dead one's pipe lingered is lost
            self._configure_locked(set(self._restarting))
            self._configured_at = time.monotonic()
        for rank, (why, deadline) in list(self._restarting.items()):
            if time.monotonic() > deadline and rank in self._adding:
                self._join_failed(rank, f"{why}, but it was not ready in time: not added")
            elif time.monotonic() > deadline:
                self._failure = f"{why}; restarted, but not ready in time"
                raise WorkerError(self._failure)

    def _fail_over(self, rank: int, why: str) -> bool:
        """FFN rank `rank` died: the survivors take its experts (failover.py) and it is
        restarted once they serve them; False when no failover can be made (under the lock)."""
        if self.failover is None or not self.failover.start(rank, why):
            return False
        self._absent.add(rank)
        self._restarting.pop(rank, None)
        self._join_wait.pop(rank, None)
        if rank not in self.failover.dead and self._procs.pids:  # died again restarting
            self._restart(rank, why, deferred=True)
        return True

    def _tick_failover(self) -> None:
        """Move an FFN failover on (under the lock): once the survivors hold the dead worker's
        experts, every other worker rejoins the data plane without it, routing by the
        survivors' placement, and its restart starts; a failover not answered in time falls
        back to waiting for the restart."""
        if self.failover is None:
            return
        what, placement, dead = self.failover.tick()
        if what == "ready":
            assert placement is not None
            self._epoch += 1
            rejoin = self._rejoin(placement.to_dict())
            for k in self._others(set(dead)):
                self._send_control(k, rejoin)
            for rank, why in dead.items():
                if self._procs.pids:  # spawned: start it again; by hand: it says hello
                    self._restart(rank, why, deferred=True)
        elif what == "abandoned":
            for rank, why in dead.items():
                self._absent.discard(rank)
                if self._procs.pids:
                    self._restart(rank, why)

    def _rejoin(self, placement: dict | None = None) -> Rejoin:
        """The `Rejoin` of the current epoch (under the lock): its attention members, and the
        FFN ranks out of it."""
        return Rejoin(self._epoch, self._plane_members(), placement, tuple(sorted(self._absent)))

    def _others(self, batch: set[int]) -> list[int]:
        """Every worker still in the data plane but `batch` (whom a `Rejoin` goes to)."""
        r = self.cfg.attention_slots
        return [
            k
            for k in range(self.cfg.world_size)
            if k not in batch and k not in self._absent and not (k < r and self.workers[k].dead)
        ]

    def _restart(self, rank: int, why: str, deferred: bool = False) -> None:
        """A dead worker: start it again under a new epoch and tell every other worker to
        rejoin the data plane there (under the lock). The FFN side is stateless: attention
        workers keep their KV and run the interrupted step again, so nothing is replayed; a
        restarted attention worker starts empty and is routed to once ready. When the restart
        budget is spent or the transport cannot rejoin: a WorkerError for an FFN worker, an
        attention worker stays gone (the others serve)."""
        cfg = self.cfg
        if self.restarts >= cfg.max_restarts or cfg.transport not in RESTARTABLE:
            cause = (
                f"the {cfg.transport} transport cannot rejoin a restarted worker"
                if cfg.transport not in RESTARTABLE
                else f"--max-restarts {cfg.max_restarts} spent"
            )
            failed_over = self.failover is not None and rank in self._absent
            if rank < cfg.attention_slots or failed_over:
                log.error("%s: not restarted (%s)", why, cause)
                self._abandoned.add(rank)
                self._restarting.pop(rank, None)
                return
            self._failure = f"{why} ({cause})"
            raise WorkerError(self._failure)
        delay = restart_backoff_s(self.restarts + 1)
        self._respawn_due[rank] = time.monotonic() + delay
        self._take_back({rank: why}, delay, deferred=deferred)
        log.warning(
            "%s: restarting it in %.0fs (%d of %d)", why, delay, self.restarts, cfg.max_restarts
        )

    def _readmit(self, m: Hello) -> None:
        """A worker of an already configured rank says hello: it was started again, by hand or
        by an outside supervisor (one the front spawned itself is in `_restarting` already).
        Its predecessor is gone: its requests move at once (attention), and nothing more is
        routed to it; the group rejoins under a new epoch with it, as for a restart by the
        front (not counted against its budget), once the workers restarted with it have said
        hello too (`_take_back_settled`). A hello for a free attention slot (of
        `max_attention_workers`) is a worker started by hand to join: it is taken in the same
        way, as a new member."""
        if not 0 <= m.rank < self.cfg.world_size or m.rank in self._restarting:
            return
        if self._procs.pids:  # spawned workers: a hello from one not restarted is stale
            return
        if m.rank in self._hellos:
            return  # it says hello every second until configured
        why = f"worker rank {m.rank} was started again (pid {m.pid})"
        if m.rank in self._absent and not (self.failover and self.failover.pending):
            # a failed-over FFN worker started again: the survivors serve until it has loaded
            self._take_back({m.rank: why}, 0.0, deferred=True)
            return
        joins = m.rank < self.cfg.attention_slots and m.rank not in self._members
        if joins:  # a free slot: a worker started by hand to join (`add_worker`'s twin)
            why = f"attention worker {m.rank} joins (pid {m.pid})"
            self._join(m.rank)
        elif m.rank < self.cfg.attention_slots:
            self._lose(m.rank, why, dead=True)
        now = time.monotonic()
        if not self._hellos:
            self._hellos_first = now
        self._hellos_last = now
        self._hellos[m.rank] = why
        self.restarts += 0 if joins else 1  # counted now: its requests moved already

    def _take_back_settled(self) -> None:
        """Take back the workers that said hello (under the lock), all under one new epoch, once
        none has for REJOIN_SETTLE_S (or REJOIN_SETTLE_MAX_S after the first)."""
        if not self._hellos:
            return
        now = time.monotonic()
        if (
            now - self._hellos_last < REJOIN_SETTLE_S
            and now - self._hellos_first < REJOIN_SETTLE_MAX_S
        ):
            return
        batch, self._hellos = self._hellos, {}
        self._take_back(batch, 0.0, counted=True)
        log.warning(
            "%s: taking %s back into the group (epoch %d)",
            "; ".join(batch.values()),
            "it" if len(batch) == 1 else "them",
            self._epoch,
        )

    def _take_back(
        self,
        batch: dict[int, str],
        start_in_s: float,
        counted: bool = False,
        deferred: bool = False,
    ) -> None:
        """The one path of workers started again (under the lock): a new epoch, `Configure`
        for each as soon as it connects (until it is ready, by the startup deadline counted from
        its start), `Rejoin` for every other worker still there (`counted`: the restarts were
        counted when they said hello; `deferred`: a failed-over FFN worker, whose `Rejoin`s
        wait for its `Joining`)."""
        if not counted:
            self.restarts += len(batch)
        self._epoch += 1
        deadline = time.monotonic() + start_in_s + self.cfg.startup_timeout_s
        for rank, why in batch.items():
            self._restarting[rank] = (why, deadline)
        self._configured_at = 0.0
        if deferred:
            for rank in batch:
                self._join_wait[rank] = self._epoch
            return
        rejoin = self._rejoin()
        for k in self._others(set(batch)):
            self._send_control(k, rejoin)

    def _check_heard(self) -> None:
        """Silent workers (called after reading what arrived, so a front that did not read for a
        while is not fooled): an attention worker silent for STALL_S loses its requests to the
        others; requests no worker could take for `silence_limit_s` end with an error."""
        if self._closed:
            return
        self._take_back_settled()
        now = time.monotonic()
        if self.failover is not None:
            for j, heard in list(self._ffn_heard.items()):
                if j in self._absent or j in self._restarting or j in self._respawn_due:
                    continue
                if j in self._hellos or now - heard <= WEDGED_S or not self.failover.can_take(j):
                    continue
                why = f"FFN worker {j} sent nothing for {now - heard:.1f}s: declared wedged"
                if self._procs.pids:  # spawned: kill it, then its exit fails over
                    if self._procs.alive(j):
                        log.warning("%s, killing it so the survivors take its experts", why)
                        self._procs.kill_rank(j)
                else:  # started by hand: fail over; it comes back by hello or by waking up
                    self._fail_over(j, why)
        for w in self.workers:
            silent = now - w.last_heard
            if not w.down and silent > STALL_S:
                self._lose(w.rank, f"attention worker {w.rank} sent nothing for {silent:.1f}s")
        if not self._parked:
            return
        parked, self._parked = sorted(self._parked), set()
        if any(not w.down for w in self.workers):
            for rid in parked:
                self._place(rid)
        elif (
            all(w.dead for w in self.workers) and not self._restarting and not self._hellos
        ) or now - (self._parked_since or now) > silence_limit_s(self.cfg.sync_timeout_s):
            for rid in parked:
                self._end(rid, "no attention worker could serve it")
        else:
            self._parked = set(parked)
        if not self._parked:
            self._parked_since = None

    def _lose(self, rank: int, why: str, dead: bool = False) -> None:
        """Route nothing more to attention worker `rank` and move its requests to the others
        (under the lock). A worker that is only silent is told to drop them (it reads that if it
        wakes up), and serves again once it speaks."""
        w = self.workers[rank]
        w.dead = w.dead or dead
        if w.down:
            return
        w.down = why
        mine = [rid for rid, k in self._owner.items() if k == rank]
        log.warning("%s: moving its %d request(s) to the other attention workers", why, len(mine))
        for rid in mine:
            w.outstanding.pop(rid, None)
            t = self._tracked[rid]
            if not w.dead:
                try:
                    control.send(self._controls[rank], Abort(self._wire_id(rid)), timeout_s=0.0)
                except (TimeoutError, zmq.ZMQError):
                    pass
            self._wire.pop(self._wire_id(rid), None)
            if t.migrations >= self.cfg.migration_limit:
                self._end(rid, f"its attention worker failed and it moved {t.migrations} times")
                continue
            t.migrations += 1
            self.requests_migrated += 1
            self._place(rid)

    def _place(self, rid: str) -> int:
        """Send a request (first, or again) to the cheapest attention worker still serving, with
        the tokens it generated so far; a worker that does not take it (dead, not yet noticed)
        passes it to the next. Parked when none can take it now (under the lock). Returns the
        worker's index, or PARKED."""
        t = self._tracked[rid]
        live = [w.rank for w in self.workers if not w.down]
        while live:
            k = self.router.choose(self._drained.among(live), (*t.prompt, *t.generated))
            wire = self._wire_id(rid)
            add = AddRequest(wire, t.prompt, t.params, t.seed, tuple(t.generated))
            try:
                control.send(self._controls[k], add, timeout_s=ADD_TIMEOUT_S)
            except (TimeoutError, zmq.ZMQError) as exc:
                self.router.routed[k] -= 1
                live.remove(k)
                log.warning("attention worker %d does not take requests: %s", k, exc)
                continue
            self._owner[rid] = k
            if wire != rid:  # a moved request's new id (_forget drops it)
                self._wire[wire] = rid
            w = self.workers[k]
            w.outstanding[rid] = len(t.prompt) + len(t.generated)
            w.adds_sent += 1
            return k
        # none took it: it waits at the front for one to come back
        self._owner[rid] = PARKED
        self._parked.add(rid)
        if self._parked_since is None:
            self._parked_since = time.monotonic()
        return PARKED

    def _wire_id(self, rid: str) -> str:
        """The id a request has on its attention worker: its own until it first moves, then a
        new one per move, so that what an old worker still sends for it (a stalled one that
        woke up, a step that was in flight) is never taken for the new incarnation's tokens,
        even on the same worker."""
        n = self._tracked[rid].migrations
        return rid if n == 0 else f"{rid}{MOVE_SEP}{n}"

    def _forget(self, rid: str) -> None:
        """Drop what the front tracks of a request that ended (under the lock)."""
        self._owner.pop(rid, None)
        t = self._tracked.pop(rid, None)
        if t is not None and t.migrations:
            self._wire.pop(f"{rid}{MOVE_SEP}{t.migrations}", None)

    def _end(self, rid: str, why: str) -> None:
        """End a request that cannot be served any more with an error event (under the lock)."""
        log.error("request %s ends: %s", rid, why)
        self._forget(rid)
        self._pending.append(TokenEvent(rid, -1, True, FinishReason.ABORT))

    # -- the Engine interface ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> int:
        """Admit a request and route it to the least-loaded attention worker that takes it;
        returns that worker's index (PARKED when none took it: it waits, as a moved request
        does, for one to come back). Thread-safe (the server calls it on its event loop while `step` runs
        elsewhere)."""
        with self._lock:
            if self._closed or self._failure is not None:
                raise WorkerError(self._failure or "the multi-process engine is closed")
            if isinstance(request_id, str) and MOVE_SEP in request_id:
                raise UserInputError("a request id must not hold the character U+001F")
            request = admit(
                request_id,
                prompt_token_ids,
                params,
                arrival_time,
                vocab_size=self.vocab_size,
                max_model_len=self.max_model_len,
                rng=self._rng,
                live=self._owner,
                tokenizer_file=self.model_path / "tokenizer.json",
            )
            live = [w.rank for w in self.workers if not w.down]
            if not live:
                raise WorkerError("no attention worker serves now: " + "; ".join(self._problems()))
            self._tracked[request_id] = Tracked(
                request.prompt_token_ids, params, request.sampling_seed
            )
            return self._place(request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its worker frees its KV blocks when it reads the abort. Thread-safe."""
        with self._lock:
            k = self._owner.get(request_id)
            if k is None:
                return False
            wire = self._wire_id(request_id)
            self._forget(request_id)
            if k == PARKED:
                self._parked.discard(request_id)
                return True
            self.workers[k].outstanding.pop(request_id, None)
            if self._closed or (self._procs.pids and not self._procs.alive(k)):
                return True  # nobody left to tell
            try:
                control.send(self._controls[k], Abort(wire), timeout_s=ABORT_TIMEOUT_S)
            except (TimeoutError, zmq.ZMQError) as exc:
                log.warning("abort of %s not delivered to worker %d: %s", request_id, k, exc)
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._owner or self._pending)

    def owner(self, request_id: str) -> int | None:
        """The attention worker serving `request_id` (None once it finished or was aborted;
        PARKED while no attention worker can)."""
        with self._lock:
            return self._owner.get(request_id)

    def worker_log(self, rank: int) -> Path | None:
        """The log file of spawned worker `rank` (None for workers started by hand)."""
        logs = self._procs.logs
        return logs[rank] if rank < len(logs) else None

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        """Token events that arrived within `timeout_s` (raises WorkerError if the group cannot
        serve any more)."""
        messages = self._receive(timeout_s)
        with self._lock:
            self._check_alive()
            for m in messages:
                self._pending.extend(self._handle(m))
            self._check_heard()
            self._tick_failover()
            if self.switch is not None:
                self.switch.tick(propose=not self._absent and not self._join_wait)
            out, self._pending = self._pending, []
        return out

    def _send_control(self, rank: int, msg: object) -> None:
        """A control message to one worker (under the lock); a full queue is that worker's
        problem, which the failure detector sees."""
        try:
            control.send(self._controls[rank], msg, timeout_s=1.0)
        except (TimeoutError, zmq.ZMQError) as exc:
            log.warning("control message to rank %d not sent: %s", rank, exc)

    def poll_idle(self) -> None:
        """Read worker reports without waiting, while there is nothing to step: heartbeats
        keep `state()` current (KV freed by an abort, final AFD stats) and a dead worker is a
        WorkerError now rather than at the next request. Token events are kept for `step`."""
        messages = self._receive(0.0)
        with self._lock:
            self._check_alive()
            for m in messages:
                self._pending.extend(self._handle(m))
            self._check_heard()
            self._tick_failover()

    def _receive(self, timeout_s: float) -> list:
        with self._recv_lock:
            if self._closed:
                return []
            return control.recv_all(self._events, timeout_s, control.TO_FRONT)

    def _handle(self, m: object) -> list[TokenEvent]:
        """Apply one worker message (under the lock); the token events it carries."""
        if isinstance(m, Failed):
            attention = m.role == "attention" and 0 <= m.rank < len(self.workers)
            if m.fatal and attention:  # it exits: its requests go on elsewhere
                self._lose(m.rank, f"attention worker {m.rank}: {m.message}", dead=True)
                return []
            if m.fatal:
                self._failure = f"{m.role} worker {m.rank}: {m.message}"
                raise WorkerError(self._failure)
            rid = m.request_id
            if attention and rid is not None:
                self.workers[m.rank].adds_failed += 1  # only a refused add names a request id
            if rid is not None and attention and self._current(rid, m.rank) is not None:
                rid = self._wire.get(rid, rid)
                log.warning("request %s failed on worker %s: %s", rid, m.rank, m.message)
                self._forget(rid)
                self.workers[m.rank].outstanding.pop(rid, None)
                return [TokenEvent(rid, -1, True, FinishReason.ABORT)]
            return []
        if self.failover is not None and self.failover.observe(m):
            return []
        if self.switch is not None and self.switch.observe(m):
            return []
        if isinstance(m, Joining):
            self._joining(m)
            return []
        if isinstance(m, Hello):
            self._readmit(m)
            return []
        if isinstance(m, Ready) and m.rank in self._restarting:  # a restarted worker
            assert self._fingerprint is not None  # set when the group first got ready
            self._check_fingerprint(m.rank, m.fingerprint, {-1: self._fingerprint})
            joined = m.rank in self._adding
            verb = "joined the group" if joined else "is back"
            log.warning("%s worker %d %s (epoch %d)", m.role, m.rank, verb, self._epoch)
            del self._restarting[m.rank]
            self._adding.discard(m.rank)
            if m.rank in self._ffn_heard:
                self._ffn_heard[m.rank] = time.monotonic()
                back = self.failover.back(m.rank) if self.failover is not None else None
                if back is not None:  # failed over: the two-phase switch gives it experts
                    assert self.switch is not None
                    log.warning("FFN rank %d is back: re-placing experts onto it", m.rank)
                    self.switch.begin(back)
            else:
                w = self.workers[m.rank]
                w.down, w.dead, w.last_heard = "", False, time.monotonic()
                w.status = RemoteWorker(m.rank).status  # it starts empty
                w.cached.clear()  # and with an empty prefix cache
                w.adds_sent = w.adds_failed = 0
            return []
        if not isinstance(m, StepOutputs | Heartbeat):
            return []  # a Malformed (logged by the codec) or a late Ready
        if isinstance(m, Heartbeat) and m.role == "ffn":
            if m.rank not in self._ffn_afd:
                log.warning("dropping a heartbeat from unknown FFN rank %r", m.rank)
                return []
            self._ffn_heard[m.rank] = time.monotonic()
            if m.rank in self._absent and not self._procs.pids:
                self._woke(m.rank)
            if m.afd is None:
                return []  # a pulse
            try:
                self._ffn_afd[m.rank] = AFDStatsSnapshot.from_dict(m.afd)
            except ValueError as exc:
                log.warning("dropping a malformed FFN heartbeat: %s", exc)
            return []
        if not 0 <= m.rank < len(self.workers):
            log.warning("dropping a %s from unknown rank %r", type(m).__name__, m.rank)
            return []
        w = self.workers[m.rank]
        w.last_heard = time.monotonic()
        if w.down and not w.dead:  # a stalled worker woke up: it serves again
            log.warning("attention worker %d speaks again after: %s", m.rank, w.down)
            w.down = ""
        if m.status is not None:
            try:
                w.take_status(m.status, m.afd)
            except ValueError as exc:
                log.warning("dropping malformed status from attention worker %d: %s", m.rank, exc)
        if isinstance(m, Heartbeat):
            return []
        w.take_kv_events(m.kv_stored, m.kv_removed)
        out: list[TokenEvent] = []
        for ev in m.events:
            rid = self._current(ev.request_id, m.rank)
            if rid is None:
                continue  # aborted meanwhile, or moved away from this worker
            w.outstanding[rid] = w.outstanding.get(rid, 0) + 1
            if ev.finished:
                self._forget(rid)
                w.outstanding.pop(rid, None)
            else:
                self._tracked[rid].generated.append(ev.token_id)
            out.append(ev if ev.request_id == rid else dataclasses.replace(ev, request_id=rid))
        return out

    def _woke(self, rank: int) -> None:
        """A hand-started FFN worker that was declared wedged and failed over speaks again
        (under the lock): everyone, it included, rejoins the data plane under a new epoch, and
        the two-phase switch gives it experts again (it still holds its old ones)."""
        assert self.failover is not None and self.switch is not None
        if rank in self._restarting or rank in self._join_wait or self.failover.pending:
            return
        log.warning("FFN worker %d speaks again: taking it back into the data plane", rank)
        self._absent.discard(rank)
        self._epoch += 1
        rejoin = self._rejoin()
        for k in self._others(set()):
            self._send_control(k, rejoin)
        back = self.failover.back(rank)
        if back is not None:
            self.switch.begin(back)

    def _joining(self, m: Joining) -> None:
        """A failed-over FFN worker, restarted, connects the data plane now (under the lock):
        the others rejoin it there; it holds no expert until the switch back gives it some."""
        if self._join_wait.get(m.rank) != m.epoch or m.epoch != self._epoch:
            return
        del self._join_wait[m.rank]
        self._absent.discard(m.rank)
        rejoin = self._rejoin()
        for k in self._others({m.rank}):
            self._send_control(k, rejoin)

    def _current(self, wire: str, rank: int) -> str | None:
        """The request a worker's message about `wire` is for, if it comes from the request's
        current incarnation (that worker, that move); None for anything stale."""
        rid = self._wire.get(wire, wire)
        if self._owner.get(rid) != rank or self._wire_id(rid) != wire:
            return None
        return rid

    def state(self, afd: bool = True) -> EngineState:
        """Per-worker queues, KV blocks, counters and routing, and (when `afd`) the latest AFD
        stats each worker reported: the same types the in-process `Engine` returns."""
        with self._lock:
            idle = RemoteWorker(0).status  # a worker that is down holds nothing of ours
            workers = tuple(
                WorkerState.of(
                    k,
                    idle if w.down else w.status,
                    self.router.routed[k],
                    unseen_adds=0 if w.down else w.unseen_adds(),
                    load_score=w.load_score(),
                )
                for k, w in enumerate(self.workers)
                if k in self._members
            )
            survival = dict(
                requests_migrated=self.requests_migrated,
                worker_restarts=self.restarts,
                parked=len(self._parked),
                ffn_failovers=self.failover.failovers if self.failover is not None else 0,
                ffn_workers_down=len(self._down()),
                routing=dict(self.router.by_reason),
            )
            if not afd:
                return EngineState(workers, **survival)
            # snapshots are replaced, never mutated, when a report arrives: sharing is safe
            experts = None
            if self.switch is not None:
                experts = ExpertLoadState.of(self.switch.controller)
            return EngineState(
                workers,
                tuple(w.afd for w in self.workers if w.rank in self._members),
                tuple(self._ffn_afd.values()),
                experts,
                **survival,
            )

    def healthy(self) -> bool:
        """False once the group cannot serve (an FFN worker died or reported a fatal error, or
        no attention worker is left: the server then answers 503), or the engine was closed.
        A group that lost some attention workers still serves: `problems` says what is
        wrong."""
        if self._closed or self._failure is not None:
            return False
        with self._lock:
            return any(not w.down for w in self.workers)

    def problems(self) -> list[str]:
        """What is wrong with the group now, one line each ([] when nothing): for /health,
        which reports a group with problems that still serves as degraded."""
        with self._lock:
            return self._problems()

    def drain(self, rank: int, drained: bool = True) -> int:
        """Route no new request to attention worker `rank` (what it holds finishes there), or
        route to it again; returns the requests it holds (launch/drain.py)."""
        with self._lock:
            self._check_slot(rank)
            if rank not in self._members:
                raise StateConflict(f"attention slot {rank} has no worker to drain")
            self._drained.set(rank, drained, [w.rank for w in self.workers if not w.down])
            return sum(1 for k in self._owner.values() if k == rank)

    # -- membership: attention workers added and removed at run time ---------------------------

    def _check_slot(self, rank: object) -> None:
        n = self.cfg.attention_slots
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n:
            raise UserInputError(f"attention worker rank must be in 0..{n - 1}, got {rank!r}")

    def add_worker(self, rank: int | None = None) -> int:
        """Start an attention worker in free slot `rank` (the lowest free one by default); it
        joins the data plane under a new epoch (the others rejoin; an attention worker in the
        middle of a step runs it again, so no token changes), gets `Configure`, and is routed
        to once it says `Ready` (within the startup timeout, else the slot is free again).
        Returns its rank. UserInputError when there is no free slot, for a bad or taken rank,
        for a group whose workers were started by hand (start `afdserve worker --front ...
        --rank K` for a free K instead), or a transport that cannot rejoin."""
        with self._lock:
            if self._closed or self._failure is not None:
                raise WorkerError(self._failure or "the multi-process engine is closed")
            n = self.cfg.attention_slots
            free = [k for k in range(n) if k not in self._members]
            if rank is not None:
                self._check_slot(rank)
                if rank in self._members:
                    raise StateConflict(f"attention slot {rank} has a worker already")
            elif not free:
                raise StateConflict(
                    f"no free attention slot: all {n} are taken (start the group with a larger "
                    "--max-attention-workers)"
                )
            k = free[0] if rank is None else rank
            if self.cfg.front:
                raise StateConflict(
                    f"this group's workers are started by hand: start `afdserve worker --front "
                    f"{self.cfg.front} --rank {k}` and it joins (free slots: {free})"
                )
            if self.cfg.transport not in RESTARTABLE:
                raise UserInputError(
                    f"the {self.cfg.transport} transport cannot take a worker in at run time"
                )
            self._join(k)
            self._procs.start(k)
            self._take_back({k: f"attention worker {k} added"}, 0.0, counted=True)
            log.warning("adding attention worker %d (epoch %d)", k, self._epoch)
            return k

    def _join(self, k: int) -> None:
        """Slot `k` has a worker from now on, not yet ready (under the lock)."""
        self._members.add(k)
        self._adding.add(k)
        self._abandoned.discard(k)
        w = self.workers[k]
        w.down, w.dead = f"attention worker {k} is joining", True
        if self.switch is not None:
            self.switch.attention_ranks = tuple(sorted(self._members))

    def _join_failed(self, k: int, why: str) -> None:
        """A worker added in slot `k` died or was not ready in time (under the lock): the slot
        is free again (its process, if still there, killed), and a new epoch leaves it out.
        The others were rejoining with it: their connect gives up at its deadline and they
        take this epoch's `Rejoin` then (launch/worker.py `_DataPlane.rejoin`), so the group
        survives a failed join at the cost of one connect timeout."""
        self._leave(k, why)
        proc = self._procs.detach(k) if self._procs.procs else None
        if proc is not None:
            proc.kill()
            proc.wait()
        self._take_back({}, 0.0, counted=True)

    def _leave(self, k: int, why: str) -> None:
        """Slot `k` is empty from now on (under the lock); its requests move to the others."""
        self._lose(k, why, dead=True)
        self._members.discard(k)
        self._adding.discard(k)
        self._restarting.pop(k, None)
        self._respawn_due.pop(k, None)
        self._drained.ranks.discard(k)
        w = self.workers[k]
        w.down, w.dead = EMPTY_SLOT, True
        w.outstanding.clear()
        if self.switch is not None:
            self.switch.attention_ranks = tuple(sorted(self._members))
        log.warning("%s: slot %d is free", why, k)

    def remove_worker(self, rank: int, migrate: bool = False) -> int:
        """Stop attention worker `rank` and free its slot; returns how many requests moved to
        the others (0 unless `migrate`). Drain it first (`drain`) and wait until it holds none:
        a worker that still holds requests is refused unless `migrate`, which replays them on
        the others (greedy tokens do not change). UserInputError for a bad rank, an empty slot,
        or the last attention worker serving."""
        with self._lock:
            if self._closed or self._failure is not None:
                raise WorkerError(self._failure or "the multi-process engine is closed")
            self._check_slot(rank)
            if rank not in self._members:
                raise StateConflict(f"attention slot {rank} has no worker to remove")
            others = [k for k in self._members if k != rank and not self.workers[k].down]
            if not others:
                raise StateConflict(
                    f"attention worker {rank} is the last one serving: it cannot be removed"
                )
            held = sum(1 for k in self._owner.values() if k == rank)
            if held and not migrate:
                raise StateConflict(
                    f"attention worker {rank} still holds {held} request(s): drain it "
                    f"(POST /admin/attention_workers/{rank}/drain) and wait until it holds none, "
                    "or remove it with migrate=true to move them to the others"
                )
            was_down = bool(self.workers[rank].down)
            moved_before = self.requests_migrated
            self._leave(rank, f"attention worker {rank} removed")
            if not was_down:
                try:
                    control.send(self._controls[rank], Shutdown(), timeout_s=ADD_TIMEOUT_S)
                except (TimeoutError, zmq.ZMQError):
                    pass  # it is killed below
            proc = self._procs.detach(rank) if self._procs.procs else None
            moved = self.requests_migrated - moved_before
        if proc is not None:
            reap(proc, RELEASE_TIMEOUT_S)
        return moved

    def _problems(self) -> list[str]:
        out = self._drained.problems()
        out += [
            w.down
            for w in self.workers
            if w.down
            and w.rank in self._members
            and w.rank not in self._restarting
            and w.rank not in self._hellos
        ]
        out += [
            f"{why}; {'adding' if k in self._adding else 'restarting'} it"
            for k, (why, _) in self._restarting.items()
        ]
        out += [f"{why}; taking it back" for why in self._hellos.values()]
        down = self._down()
        if down:
            m = self.cfg.ffn_workers
            out.append(
                f"running on {m - len(down)} of {m} FFN workers: FFN rank"
                f"{'s' * (len(down) > 1)} {', '.join(map(str, down))} down, "
                "its experts served by the survivors"
            )
        now = time.monotonic()
        for j, heard in sorted(self._ffn_heard.items()):
            if j in self._absent or j in down:
                continue
            if j not in self._restarting and now - heard > STALL_S:
                out.append(f"FFN worker {j} sent nothing for {now - heard:.1f}s")
        if self._failure:
            out.append(self._failure)
        return out

    def _down(self) -> list[int]:
        """FFN ranks out of service now, their experts on the survivors (an FFN failover)."""
        if self.failover is None:
            return []
        ranks = self.cfg.ffn_ranks
        p = self.failover.pending or self.failover.placement
        return [ranks[w] for w in p.down]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (shutdown message, then SIGTERM, then SIGKILL) and free sockets."""
        pinger = getattr(self, "_pinger", None)
        if pinger is not None and pinger.ident is not None:  # started
            self._stop_pings.set()
            pinger.join(5.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for ctrl in self._controls:
                try:
                    control.send(ctrl, Shutdown(), timeout_s=0.2)
                except (TimeoutError, zmq.ZMQError):
                    pass
        self._procs.stop(timeout_s)
        with self._recv_lock, self._lock:
            for s in [*self._controls, self._events]:
                s.close(linger=0)
            self._ctx.term()
        if self._store is not None:
            self._store.close()

    @property
    def exit_codes(self) -> list[int | None]:
        """Spawned workers' exit codes (None while one runs): all 0 after a clean close."""
        return self._procs.exit_codes

    @property
    def pids(self) -> list[int]:
        """Worker process ids, attention slots 0..R_MAX-1 (0 for an empty one) then the FFN
        workers."""
        return self._procs.pids

    def __del__(self) -> None:  # last resort: never leave workers behind
        if not getattr(self, "_closed", True) and hasattr(self, "_procs"):
            self._procs.kill()


def _ping_loop(engine: weakref.ref, stop: threading.Event) -> None:
    """Ping every worker each `control.PING_S`: a worker that hears nothing from its front for
    `--front-timeout-s` knows it is gone (one started by hand has no other way); and rotate the
    logs of spawned workers that grew past their limit. Holds the engine weakly, so an engine
    nobody references is still collected (and its workers killed)."""
    while not stop.wait(control.PING_S):
        front = engine()
        if front is None:
            return
        front._ping_all()
        front._procs.rotate_logs()
        del front


__all__ = ["MultiProcessEngine", "WorkerError"]
