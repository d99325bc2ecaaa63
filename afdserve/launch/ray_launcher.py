"""Ray as a placer and restarter of an AFD group's workers, never as its data plane.

One Ray actor per worker (`WorkerSupervisor`) runs and watches one `afdserve worker --front
HOST:PORT --rank K --host NODE_IP` process: the very worker one starts by hand, which says hello
to its front and, after a restart, rejoins it (multiproc.py's membership path). The actors sit
in one placement group, a bundle per worker (`bundles`: attention bundles then FFN bundles, in
worker-rank order), so Ray decides which node runs which worker and holds their resources.
Restarts go through Ray: the actor is created with `max_restarts`; when its worker process
exits the actor exits too, and when the actor dies (its node's raylet killed it, `ray.kill`)
its worker dies with it (PR_SET_PDEATHSIG), so either way Ray starts a new actor, whose new
worker rejoins the front.

Ray stays off the per-layer path on purpose: one A->F->A call through a Ray actor measured
2.9-5.1 ms against 0.12 ms over afdserve's shm and 0.33 ms over tcp (issue 20). Activations move
over afdserve's own transports (tcp, torch) between the worker processes; Ray only carries the
actors' start, `pid` and `stop` calls.

Every wait on Ray here is bounded (`timeout_s`): a `ray.get` / `ray.wait` with a timeout, a
shutdown in a thread joined with a timeout. FastAFD's unbounded shutdown wait hung 22 minutes.
`ray` is an optional dependency (`pip install afdserve[ray]`), imported only when a group starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from afdserve.errors import UserInputError
from afdserve.launch.roles import RoleMap

log = logging.getLogger("afdserve.ray")

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray's placement-group strategies (PACK: as few nodes as fit, the default)."""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RayGroupConfig:
    """What the placement group asks of the cluster, validated (every field a UserInputError
    when wrong: these are flags)."""

    roles: RoleMap
    attention_cpus: float = 1.0
    ffn_cpus: float = 1.0
    attention_gpus: float = 0.0
    ffn_gpus: float = 0.0
    attention_resource: str = ""
    """A custom Ray resource every attention bundle also asks one unit of (nodes started with
    `ray start --resources '{"NAME": N}'` run attention workers); "" none."""
    ffn_resource: str = ""
    strategy: str = "PACK"
    max_restarts: int = 3
    """How many times Ray restarts each worker's actor (-1: without end)."""
    timeout_s: float = 120.0
    """The bound of every wait on Ray (the placement group's resources, an actor's start)."""

    def __post_init__(self) -> None:
        for name in ("attention_cpus", "ffn_cpus", "attention_gpus", "ffn_gpus"):
            v = getattr(self, name)
            if not v >= 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.attention_cpus + self.attention_gpus == 0 or self.ffn_cpus + self.ffn_gpus == 0:
            raise UserInputError("a bundle must ask for some CPU or GPU (Ray rejects empty ones)")
        for name in ("attention_resource", "ffn_resource"):
            v = getattr(self, name)
            if v and (v in ("CPU", "GPU", "memory") or not v.replace("_", "").isalnum()):
                raise UserInputError(
                    f"--{name.replace('_', '-')} {v!r} is not a custom resource name "
                    "(letters, digits and _; not CPU, GPU or memory)"
                )
        if self.strategy not in STRATEGIES:
            raise UserInputError(
                f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        if self.max_restarts < -1:
            raise UserInputError(f"--max-restarts must be >= -1, got {self.max_restarts}")
        if not self.timeout_s > 0:
            raise UserInputError(f"--ray-timeout must be > 0, got {self.timeout_s}")


def bundles(cfg: RayGroupConfig) -> list[dict[str, float]]:
    """The placement group's bundles, one per worker in afdserve worker-rank order (attention
    0..r-1, then FFN 0..m-1: bundle k holds the worker of `--rank k`)."""

    def one(cpus: float, gpus: float, resource: str) -> dict[str, float]:
        b = {"CPU": cpus} if cpus else {}
        if gpus:
            b["GPU"] = gpus
        if resource:
            b[resource] = 1.0
        return b

    r, m = cfg.roles.attention_workers, cfg.roles.ffn_workers
    attn = one(cfg.attention_cpus, cfg.attention_gpus, cfg.attention_resource)
    ffn = one(cfg.ffn_cpus, cfg.ffn_gpus, cfg.ffn_resource)
    return [dict(attn) for _ in range(r)] + [dict(ffn) for _ in range(m)]


def import_ray() -> Any:
    """`import ray`, or a UserInputError that says how to get it."""
    try:
        import ray
    except ImportError:
        raise UserInputError(
            "the Ray launcher needs Ray, an optional dependency: pip install afdserve[ray]"
        ) from None
    return ray


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child, before exec: send it `sig` when the thread that started it ends (the actor's
    watcher, alive as long as the actor process; the driver's main thread for the front), so
    that no worker outlives its actor and answers its front beside the restarted one."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def node_address(ray: Any) -> str:
    """The address this node joined the cluster at (`ray start --node-ip-address`): where its
    workers' data sockets bind and peers reach them. `ray.util.get_node_ip_address()` would
    guess the default route's interface instead, even on a node started on 127.0.0.1."""
    node_id = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n.get("NodeID") == node_id:
            return n["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class WorkerSupervisor:
    """A Ray actor that runs one `afdserve worker` and lives exactly as long as it does (a
    plain class: `start_group` makes it remote; Ray restarts it, which restarts the worker)."""

    def __init__(self, worker_argv: list[str], env: dict[str, str]) -> None:
        import ray

        self.host = node_address(ray)
        self.argv = [sys.executable, "-m", "afdserve.cli", *worker_argv, "--host", self.host]
        self._started = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self._env = os.environ | env
        threading.Thread(target=self._watch, name="afd-worker-watch", daemon=True).start()
        if not self._started.wait(30):
            raise RuntimeError("the worker process did not start within 30 s")

    def _watch(self) -> None:
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, env=self._env, preexec_fn=die_with_parent
        )
        self._started.set()
        code = self._proc.wait()
        if self._stopping or code == 0:  # stopped, or its front told it to exit: not a crash
            return
        print(
            f"afdserve ray: worker {self.argv[4:8]} exited with code {code}; ending its actor "
            "so that Ray restarts it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # the actor dies with its worker: Ray restarts it (max_restarts)

    def info(self) -> dict[str, Any]:
        """The worker's pid, this actor's pid and its node's address."""
        assert self._proc is not None
        return {
            "pid": self._proc.pid,
            "actor_pid": os.getpid(),
            "host": self.host,
            "alive": self._proc.poll() is None,
        }

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the worker and wait for it (bounded; SIGKILL after): its exit code."""
        self._stopping = True
        p = self._proc
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode


@dataclass
class RayGroup:
    """The placement group and the worker actors of one launched group (handles)."""

    ray: Any
    placement_group: Any
    actors: list[Any]
    timeout_s: float

    def infos(self) -> list[dict[str, Any] | None]:
        """Each actor's `info()` (None for one that did not answer within the timeout: dead, or
        being restarted by Ray)."""
        refs = [a.info.remote() for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        out: list[dict[str, Any] | None] = []
        for ref in refs:
            try:
                out.append(self.ray.get(ref, timeout=0.1) if ref in ready else None)
            except Exception:  # the actor died under the call (Ray restarts it)
                out.append(None)
        return out

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop every worker (its actor's `stop`, bounded), kill the actors without restart and
        remove the placement group; never waits on Ray longer than `timeout_s` per step."""
        ray = self.ray
        refs = []
        for a in self.actors:
            try:
                refs.append(a.stop.remote(min(timeout_s, 10.0)))
            except Exception:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
        except Exception:
            pass


def start_group(
    cfg: RayGroupConfig,
    front: str,
    *,
    connect_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> RayGroup:
    """Reserve the placement group and start one supervised worker per bundle, each pointed at
    the front at `front` (HOST:PORT). Ray must be initialised (ray.init). A cluster without
    room for the bundles within `cfg.timeout_s` is a UserInputError naming them."""
    ray = import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    layout = bundles(cfg)
    pg = placement_group(layout, strategy=cfg.strategy, name=f"afdserve-{front}")
    try:
        ray.get(pg.ready(), timeout=cfg.timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise UserInputError(
            f"the Ray cluster has no room for the group's bundles {layout} ({cfg.strategy}) "
            f"within {cfg.timeout_s:.0f}s: see `ray status`"
        ) from None
    remote = ray.remote(WorkerSupervisor)
    actors = []
    for rank, bundle in enumerate(layout):
        argv = [
            "worker", "--front", front, "--rank", str(rank),
            "--connect-timeout-s", str(connect_timeout_s),
        ]  # fmt: skip
        actors.append(
            remote.options(
                name=f"afdserve-worker-{rank}-{front}",
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                max_restarts=cfg.max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                ),
            ).remote(argv, dict(env or {}))
        )
    group = RayGroup(ray, pg, actors, cfg.timeout_s)
    infos = group.infos()
    if any(i is None for i in infos):
        group.close()
        missing = [k for k, i in enumerate(infos) if i is None]
        raise RuntimeError(f"the actors of worker ranks {missing} did not start within "
                           f"{cfg.timeout_s:.0f}s")  # fmt: skip
    for rank, i in enumerate(infos):
        log.info("worker %d: pid %s on %s", rank, i["pid"], i["host"])  # type: ignore[index]
    return group


def shutdown(ray: Any, timeout_s: float = 15.0) -> bool:
    """`ray.shutdown()` in a thread joined for at most `timeout_s`: whether it returned."""
    t = threading.Thread(target=ray.shutdown, name="afd-ray-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def wait_process(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGTERM `proc` (the front: it drains, then exits), SIGKILL after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return proc.returncode
