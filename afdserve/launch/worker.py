"""Worker processes: `afdserve worker --front HOST:PORT --rank K` (or the front's own spawn).

A worker process is a placement of one core: an `AttentionWorker` (afd/attention_worker.py) or
an `FFNWorker` (afd/ffn_worker.py), the same objects the in-process engine runs on threads.
This module is only what a process adds around them: sockets to the front, a thin loop, and
start-up. In order:
1. connect to the front (its events and control sockets) and wait for `Configure`: the one
   `EngineConfig` of the group, this worker's rank (which says its role: rank r is the FFN
   worker) and the rendezvous store the front hosts. Nothing about the model or the group is
   a worker flag: a worker started by hand is told only where its front is;
2. load only this worker's part of the model and build its core;
3. connect the data transport (shm, torch, tcp, nixl) to its peers through the front's store;
4. tell the front `Ready` with its model fingerprint (the front checks that every worker
   serves its model), then run the loop.

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

from afdserve.errors import UserInputError

log = logging.getLogger("afdserve.worker")

HEARTBEAT_S = 1.0
STATS_EVERY_S = 0.5
"""AFD stats ride on an attention worker's events messages at most this often (and on every
heartbeat), so the front's metrics lag by at most this much while the worker steps."""

FFN_CONTROL_S = 0.1
"""An FFN worker reads its control socket this often between batches (a `Rejoin`, an FFN
failover's `HoldExperts`: each waits at most this long), and reports its stats every
HEARTBEAT_S."""

FRONT_GONE = 4
"""Exit code of a worker whose front fell silent."""

PULSE_S = 0.5
"""Every worker tells its front it is alive this often, from a thread of its own (`_Pulse`), so
a worker busy in a long step still pulses and one that stopped (SIGSTOP, a wedged host) falls
silent within a second or two, whatever its loop is doing."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process's command line says: where its front is, and what is local to
    its host. Everything else comes from the front (`messages.Configure`)."""

    front: str = ""
    """HOST:PORT of a front started with `--front` (with `rank`): its events socket is at PORT,
    rank k's control socket at PORT + 1 + k."""
    rank: int | None = None
    control: str = ""
    """Or the two addresses themselves (what a front that spawns its workers passes)."""
    events: str = ""
    host: str = ""
    """Address peers reach this worker's data sockets at (tcp: bind and advertise; torch: gloo's
    interface). Empty: tcp binds 127.0.0.1 (one host), torch picks by the rendezvous address."""
    cpus: str = ""
    """Comma-separated cores to pin this process to (empty: no pinning)."""
    connect_timeout_s: float = 60.0
    """Deadline for the front's `Configure` and for the data transport's connection."""
    front_timeout_s: float = 30.0
    """Exit (code 4) once the front, after its first message, has been silent this long: it
    pings every `control.PING_S`, so silence means it died (0: never). A worker the front
    spawned also dies with it (PR_SET_PDEATHSIG); one started by hand relies on this."""

    def __post_init__(self) -> None:
        if self.front:
            from afdserve.transport.options import parse_host_port

            parse_host_port(self.front, "--front")
            if self.rank is None or self.rank < 0:
                raise UserInputError("--front needs --rank (this worker's rank, 0..r)")
            if self.control or self.events:
                raise UserInputError("give --front, or --control and --events, not both")
        elif not (self.control and self.events):
            raise UserInputError(
                "say where the front is: --front HOST:PORT --rank K (or --control and --events)"
            )
        if not self.connect_timeout_s > 0:
            raise UserInputError(f"--connect-timeout-s must be > 0, got {self.connect_timeout_s}")
        if not self.front_timeout_s >= 0:
            raise UserInputError(f"--front-timeout-s must be >= 0, got {self.front_timeout_s}")
        if self.host and not re.fullmatch(r"[A-Za-z0-9._:-]+", self.host):
            raise UserInputError(
                f"--host must be a host name or IP address (no scheme or port), got {self.host!r}"
            )

    @property
    def addresses(self) -> tuple[str, str]:
        """(control, events) ZeroMQ addresses of the front."""
        if not self.front:
            return self.control, self.events
        host, _, port = self.front.rpartition(":")
        return f"tcp://{host}:{int(port) + 1 + (self.rank or 0)}", f"tcp://{host}:{port}"


@dataclass(frozen=True)
class _Group:
    """This worker's place in its group, from the front's `Configure`."""

    cfg: Any  # EngineConfig
    rank: int
    model: str
    rendezvous: str
    placement: Any = None  # Placement | None
    epoch: int = 0
    """The data plane's incarnation (`Configure.epoch`, then each `Rejoin`)."""
    transport_key: bytes = dataclasses.field(default=b"", repr=False)
    members: tuple[int, ...] = ()
    """The attention ranks in the data plane at `epoch` (`Configure.members`; empty: all)."""
    absent: tuple[int, ...] = ()
    """FFN ranks out of the data plane (an FFN failover): not connected to."""

    @property
    def r(self) -> int:
        """R_MAX, the attention rank slots: FFN ranks start here."""
        return self.cfg.attention_slots

    @property
    def peers(self) -> tuple[int, ...]:
        """Who this worker's data transport connects to: an attention worker to every FFN
        worker not `absent` (failed over); an FFN worker to the attention ranks that are
        members now (an empty slot is never waited for)."""
        from afdserve.transport.options import afd_peers

        every = afd_peers(self.rank, self.r, self.cfg.ffn_workers)
        if self.role == "attention":
            return tuple(p for p in every if p not in self.absent)
        return tuple(k for k in every if not self.members or k in self.members)

    @property
    def role(self) -> str:
        return "ffn" if self.rank >= self.r else "attention"

    @property
    def threads(self) -> int:
        c = self.cfg
        return (c.ffn_threads or c.worker_threads) if self.role == "ffn" else c.worker_threads


def fingerprint(model_path: str, config: Any, dtype: Any, batch_invariant: bool = False):
    """What the workers of a group and their front must agree on (a messages.Fingerprint)."""
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


def run_worker(wcfg: WorkerConfig) -> int:
    import zmq

    logging.basicConfig(level=logging.WARNING, format="[worker] %(levelname)s %(message)s")
    _die_with_parent()
    stop = threading.Event()
    _install_stop(stop)
    control_addr, events_addr = wcfg.addresses
    ctx = zmq.Context()
    events = ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    events.connect(events_addr)
    commands = ctx.socket(zmq.PULL)
    commands.connect(control_addr)
    group = None
    pulse = None
    try:
        group = _await_configure(commands, events, wcfg, stop)
        if group is None:
            return 0  # stopped (signal or the front's shutdown) before being configured
        pulse = _Pulse(ctx, events_addr, group)
        _setup_process(group, wcfg)
        if group.role == "ffn":
            return _run_ffn(group, wcfg, commands, events, stop)
        return _run_attention(group, wcfg, commands, events, stop)
    except UserInputError as exc:
        _report(events, group, f"{exc}", fatal=True)
        print(f"afdserve worker: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # report, then die loudly: the front turns it into a clear error
        _report(events, group, f"{type(exc).__name__}: {exc}", fatal=True)
        raise
    finally:
        if pulse is not None:
            pulse.close()
        commands.close(linger=0)
        events.close()
        ctx.term()


class _Pulse:
    """A thread that sends the front a bare `Heartbeat` every PULSE_S on a socket of its own
    (ZeroMQ sockets are not thread-safe): the front's liveness signal, independent of the
    worker's loop, which may legitimately wait for a long step."""

    def __init__(self, ctx: Any, events_addr: str, group: _Group) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ctx, events_addr, group), name="afd-pulse", daemon=True
        )
        self._thread.start()

    def _run(self, ctx: Any, events_addr: str, group: _Group) -> None:
        import zmq

        from afdserve.launch import control
        from afdserve.launch.messages import Heartbeat

        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(events_addr)
        try:
            beat = Heartbeat(group.rank, group.role)  # type: ignore[arg-type]
            while not self._stop.wait(PULSE_S):
                try:
                    control.send(sock, beat, timeout_s=0.0)
                except (TimeoutError, zmq.ZMQError):
                    pass  # the front is not reading: it sees the silence itself
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


def _await_configure(
    commands: Any, events: Any, wcfg: WorkerConfig, stop: threading.Event
) -> _Group | None:
    """The front's `Configure` (None if stopped first), saying `Hello` every second meanwhile;
    a UserInputError when none comes by the deadline, or when it is for another rank or
    schema."""
    import zmq

    from afdserve.launch import control
    from afdserve.launch.messages import SCHEMA_VERSION, Configure, Hello, Shutdown

    deadline = time.monotonic() + wcfg.connect_timeout_s
    last_hello = 0.0
    while not stop.is_set():
        if wcfg.rank is not None and time.monotonic() - last_hello >= 1.0:
            last_hello = time.monotonic()
            try:
                control.send(events, Hello(wcfg.rank, os.getpid()), timeout_s=0.0)
            except (TimeoutError, zmq.ZMQError):
                pass  # the front is not there yet
        if time.monotonic() > deadline:
            where = wcfg.front or wcfg.control
            raise UserInputError(
                f"no configuration from the front at {where} within {wcfg.connect_timeout_s:.0f}s"
            )
        for m in control.recv_all(commands, 0.2, control.TO_WORKER):
            if isinstance(m, Shutdown):
                return None
            if not isinstance(m, Configure):
                continue  # a ping, or garbage (logged by the codec)
            if m.schema != SCHEMA_VERSION:
                raise UserInputError(
                    f"the front speaks control schema {m.schema}, this worker {SCHEMA_VERSION}: "
                    "run one afdserve version for the front and its workers"
                )
            if wcfg.rank is not None and m.rank != wcfg.rank:
                raise UserInputError(
                    f"started as rank {wcfg.rank} but the front's socket is rank {m.rank}'s"
                )
            from afdserve.eplb.placement import Placement

            placement = None if m.placement is None else Placement.from_dict(m.placement)
            group = _Group(
                m.config,
                m.rank,
                m.model,
                m.rendezvous,
                placement,
                m.epoch,
                m.transport_key,
                tuple(m.members),
                tuple(m.absent),
            )
            logging.getLogger().handlers[0].setFormatter(
                logging.Formatter(f"[{group.role}{group.rank}] %(levelname)s %(message)s")
            )
            return group
    return None


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):  # no orphans if the front is killed
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _setup_process(group: _Group, wcfg: WorkerConfig) -> None:
    import torch

    torch.set_num_threads(group.threads)
    if wcfg.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in wcfg.cpus.split(",") if c != ""})
        except (OSError, ValueError) as exc:
            log.warning("cannot pin to cpus %r: %s", wcfg.cpus, exc)


def _install_stop(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class _FrontWatch:
    """Whether the front is gone: silent for `timeout_s` since its last message (the clock
    starts at its first one, which `Configure` was)."""

    def __init__(self, timeout_s: float, where: str) -> None:
        self.timeout_s = timeout_s
        self.where = where
        self.last = time.monotonic()

    def heard(self, messages: list) -> None:
        if messages:
            self.last = time.monotonic()

    def gone(self) -> bool:
        silent = time.monotonic() - self.last
        if not self.timeout_s or silent <= self.timeout_s:
            return False
        log.error(
            "the front (%s) sent nothing for %.0fs (limit %.0fs): it is gone; exiting",
            self.where,
            silent,
            self.timeout_s,
        )
        return True


def _report(
    events: Any, group: _Group | None, message: str, fatal: bool, request_id: str | None = None
) -> None:
    """Tell the front about an error (best effort: a front that does not listen is gone; one
    that never configured this worker has no rank to hear it from)."""
    if group is None:
        return
    from afdserve.launch import control
    from afdserve.launch.messages import Failed

    msg = Failed(group.rank, group.role, message, fatal, request_id)  # type: ignore[arg-type]
    try:
        control.send(events, msg, timeout_s=1.0)
    except TimeoutError:
        pass


def _load(group: _Group, parts: tuple[str, ...]):  # -> LoadedModel (torch loads after setup)
    """This worker's part of the model: an FFN worker under expert parallelism reads only the
    experts its placement gives it; an attention worker also reads the routers then."""
    from afdserve.launch.local import load_model
    from afdserve.model.kernels import Kernels

    c = group.cfg
    held = None
    if group.placement is not None and group.role == "ffn":
        j = group.rank - group.r
        held = {i: w[j] for i, w in enumerate(group.placement.layers) if w is not None}
    model = load_model(
        group.model,
        c.dtype,
        c.device,
        parts,
        Kernels(batch_invariant=c.batch_invariant),
        held=held,
    )
    if c.device != "cpu":  # NIXL's VRAM slots and the transport's threads use the current one
        import torch

        torch.cuda.set_device(torch.device(c.device).index or 0)  # "cuda" alone means cuda:0
    return model, fingerprint(model.path, model.config, model.dtype, c.batch_invariant)


def _create_transport(group: _Group, wcfg: WorkerConfig):
    from afdserve.transport.registry import create_transport

    c = group.cfg
    backend: dict[str, Any] = {}
    if c.transport == "nixl" and c.device != "cpu":  # nixl moves GPU memory itself
        backend["device"] = "cuda"
    if wcfg.host and c.transport == "tcp":  # several hosts: bind where peers can dial
        backend["bind_host"] = wcfg.host
    if wcfg.host and c.transport == "torch":
        backend["gloo_host"] = wcfg.host
    if c.transport != "shm":  # shm only names its session after the address
        backend["external_store"] = True
    if group.transport_key:  # tcp proves it on every data connection
        backend["auth_key"] = group.transport_key
    return create_transport(
        c.transport,
        group.rank,
        c.world_size,
        rendezvous=group.rendezvous,
        peers=group.peers,
        connect_timeout_s=wcfg.connect_timeout_s,
        epoch=group.epoch,
        **backend,
    )


def _joining(events: Any, group: _Group) -> None:
    """Tell the front this worker connects the data plane now (`Joining`): after an FFN
    failover the others are told to rejoin only then, not while this one loads its part."""
    from afdserve.launch import control
    from afdserve.launch.messages import Joining

    control.send(events, Joining(group.rank, group.epoch), timeout_s=1.0)


class _DataPlane:
    """A worker's data transport, which a `Rejoin` replaces: the old one is closed (its peer is
    gone or reconnecting too) and a new one connected under the front's new epoch."""

    def __init__(self, group: _Group, wcfg: WorkerConfig) -> None:
        self.group, self.wcfg = group, wcfg
        self.transport = _create_transport(group, wcfg)

    def rejoin(
        self, epoch: int, members: tuple[int, ...] = (), absent: tuple[int, ...] = ()
    ) -> Any:
        """Connect again under `epoch`, to the attention ranks `members` (empty: all) and every
        FFN rank but the `absent` ones; the new transport, or None when a peer did not connect
        by the deadline (a worker that was to join died or never came): this worker then waits,
        serving nothing, for the front's next `Rejoin`, which leaves that peer out."""
        from afdserve.errors import TransportTimeout

        log.warning(
            "rejoining the data plane at epoch %d (attention members %s%s)",
            epoch,
            list(members) if members else "all",
            f"; FFN ranks {list(absent)} left out" if absent else "",
        )
        self.close()
        self.group = dataclasses.replace(
            self.group, epoch=epoch, members=tuple(members), absent=tuple(absent)
        )
        try:
            self.transport = _create_transport(self.group, self.wcfg)
        except TransportTimeout as exc:
            log.error("epoch %d: %s; waiting for the front's next Rejoin", epoch, exc)
            self.transport = None
        return self.transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


# -- the FFN worker's loop ----------------------------------------------------------------------


def _run_ffn(group: _Group, wcfg: WorkerConfig, commands: Any, events: Any, stop) -> int:
    from afdserve.launch import control
    from afdserve.launch.local import make_ffn_worker
    from afdserve.launch.messages import Heartbeat, Ready, Rejoin, Shutdown

    model, mine = _load(group, ("ffn",))
    _joining(events, group)
    plane = _DataPlane(group, wcfg)
    try:
        core = make_ffn_worker(group.cfg, model, plane.transport, group.placement)
        experts = _ExpertHolder(group, model.config, core)
        control.send(events, Ready(group.rank, "ffn", os.getpid(), mine))
        last_beat = last_read = 0.0
        front = _FrontWatch(wcfg.front_timeout_s, wcfg.front or wcfg.control)
        while not stop.is_set():
            if plane.transport is not None:
                core.serve_once(0.05)
            else:
                time.sleep(0.05)  # disconnected: only the front's next Rejoin matters
            if time.monotonic() - last_read < FFN_CONTROL_S:
                continue
            last_read = time.monotonic()
            msgs = control.recv_all(commands, 0, control.TO_WORKER)
            front.heard(msgs)
            if any(isinstance(m, Shutdown) for m in msgs):
                break
            for m in msgs:
                if isinstance(m, Rejoin):
                    if plane.rejoin(m.epoch, m.members, m.absent) is not None:
                        core.reconnect(plane.transport)
                experts.apply(m, events)
            if front.gone():
                return FRONT_GONE
            if time.monotonic() - last_beat < HEARTBEAT_S:
                continue
            last_beat = time.monotonic()
            beat = Heartbeat(group.rank, "ffn", afd=core.stats.snapshot().to_dict())
            control.send(events, beat, timeout_s=1.0)
        return 0
    finally:
        plane.close()


class _ExpertHolder:
    """An FFN worker's side of EPLB's re-placement (`HoldExperts`): load the experts it lacks
    from the model's files, then swap the new sets in between two batches."""

    def __init__(self, group: _Group, config: Any, core: Any) -> None:
        self.group, self.config, self.core = group, config, core

    def apply(self, m: Any, events: Any) -> None:
        from afdserve.launch import control
        from afdserve.launch.local import load_experts
        from afdserve.launch.messages import ExpertsHeld, HoldExperts

        if not isinstance(m, HoldExperts):
            return
        from afdserve.eplb.placement import Placement

        try:
            p = Placement.from_dict(m.placement)
            j = self.group.rank - self.group.r
            want = {layer: p.experts_of(layer, j) for layer in p.moe_layers}
            have = self.core.experts
            missing = {
                layer: [e for e in ids if e not in have[layer].held] for layer, ids in want.items()
            }
            new = {}
            if any(missing.values()):
                new = load_experts(self.group.model, self.group.cfg, self.config, missing)
            sets = {}
            for layer, ids in want.items():
                merged = have[layer].union(new[layer]) if layer in new else have[layer]
                sets[layer] = merged if m.keep_others else merged.subset(ids)
            self.core.use_experts(sets)
        except (UserInputError, ValueError, KeyError) as exc:
            _report(events, self.group, f"re-placement refused: {exc}", False)
            return
        control.send(events, ExpertsHeld(self.group.rank, p.version), timeout_s=1.0)


# -- the attention worker's loop ----------------------------------------------------------------


def _run_attention(group: _Group, wcfg: WorkerConfig, commands: Any, events: Any, stop) -> int:
    from afdserve.afd.ffn_link import StepInterrupted
    from afdserve.launch import control
    from afdserve.launch.local import make_attention_worker, make_link
    from afdserve.launch.messages import Heartbeat, Ready, Rejoin, Shutdown, StepOutputs

    c = group.cfg
    parts = ("attention", "router") if c.ffn_workers > 1 else ("attention",)
    model, mine = _load(group, parts)
    _joining(events, group)
    plane = _DataPlane(group, wcfg)
    try:
        link = make_link(group.rank, c, model, plane.transport, group.placement)
        core = make_attention_worker(group.rank, c, model, link)
        core.scheduler.allocator.record_events = c.enable_prefix_caching  # for the front
        stats = _StatsShipper(core.stats)
        ready = Ready(group.rank, "attention", os.getpid(), mine, max_model_len=core.max_model_len)
        control.send(events, ready)
        last_beat = time.monotonic()
        front = _FrontWatch(wcfg.front_timeout_s, wcfg.front or wcfg.control)
        early: list = []  # front messages read while a step waited for a late FFN result

        def interrupted() -> bool:  # the link asks while a result is late
            msgs = control.recv_all(commands, 0, control.TO_WORKER)
            front.heard(msgs)
            early.extend(msgs)
            return any(isinstance(m, Rejoin | Shutdown) for m in msgs)

        link.interrupted = interrupted
        while not stop.is_set():
            busy = core.has_unfinished() and plane.transport is not None
            wait = 0 if busy else (0.05 if plane.transport is None else HEARTBEAT_S)
            msgs = early + control.recv_all(commands, wait, control.TO_WORKER)
            early.clear()
            front.heard(msgs)
            if any(isinstance(m, Shutdown) for m in msgs):
                return 0
            for m in msgs:
                if isinstance(m, Rejoin):
                    if plane.rejoin(m.epoch, m.members, m.absent) is not None:
                        link.transport = plane.transport
                    if m.placement is not None and link.dispatcher is not None:
                        from afdserve.eplb.placement import Placement

                        # an FFN failover: the step run again routes around the down workers
                        link.dispatcher.use(Placement.from_dict(m.placement))
                else:
                    _apply(m, core, events, group)
            if front.gone():
                return FRONT_GONE
            try:
                connected = plane.transport is not None
                events_of_step = core.step() if connected and core.has_unfinished() else None
            except StepInterrupted as exc:
                log.warning("%s; it runs again once connected", exc)
                continue
            if events_of_step is not None:  # a step ran: its events and the status after it
                afd = stats.take(force=not core.has_unfinished())  # final stats at once
                load = link.dispatcher.take_counts() if link.dispatcher is not None else None
                stored, removed = core.take_kv_events()
                out = StepOutputs(
                    group.rank,
                    core.status(),
                    tuple(events_of_step),
                    afd,
                    load or None,
                    stored,
                    removed,
                )
                control.send(events, out)
            elif time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                beat = Heartbeat(group.rank, "attention", core.status(), stats.take(force=True))
                control.send(events, beat, timeout_s=1.0)
        return 0
    finally:
        plane.close()


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


def _apply(m: Any, core: Any, events: Any, group: _Group) -> None:
    """One front message to the core. A request the core refuses, or an add that did not
    decode, is answered with a non-fatal `Failed` naming it: the worker keeps serving and the
    front does not wait for that request forever."""
    from afdserve.launch import control
    from afdserve.launch.messages import Abort, AddRequest, Malformed, PlacementInUse, UsePlacement
    from afdserve.types import Request

    try:
        if isinstance(m, UsePlacement):  # between steps: the next one routes by it
            from afdserve.eplb.placement import Placement

            p = Placement.from_dict(m.placement)
            core.runner.link.dispatcher.use(p)
            control.send(events, PlacementInUse(group.rank, p.version), timeout_s=1.0)
        elif isinstance(m, AddRequest):
            core.add_request(
                Request(m.request_id, m.prompt, m.params, time.monotonic(), m.seed, m.generated)
            )
        elif isinstance(m, Abort):
            core.abort(m.request_id)
        elif isinstance(m, Malformed) and m.request_id is not None:
            _report(events, group, f"malformed request: {m.error}", False, m.request_id)
    except (UserInputError, TypeError, ValueError, AttributeError) as exc:  # never kills it
        _report(events, group, str(exc), False, getattr(m, "request_id", None))


def config_from_args(args: Any) -> WorkerConfig:
    fields = {f.name for f in dataclasses.fields(WorkerConfig)}
    return WorkerConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
