"""`python -m afdserve.launch.ray`: one AFD group whose workers Ray places and restarts.

    ray start --head --node-ip-address HEAD_IP --port 6379        # on the head node
    ray start --address HEAD_IP:6379 --node-ip-address NODE_IP    # on every other node
    python -m afdserve.launch.ray --address HEAD_IP:6379 --roles front,attention:2,ffn:1 \\
        --front-port 29600 -- --model builtin:tiny-llama --port 8000

The driver (this process) connects to the Ray cluster (`--address`; without it, it starts a
local one on --node-ip), runs the front here (`afdserve serve --front NODE_IP:PORT` with the
flags after `--`, as the torchrun path's front rank does), reserves a placement group of one
bundle per worker and starts one `WorkerSupervisor` actor per bundle (ray_launcher.py). Ray
restarts a dead worker's actor (`--max-restarts`); its new worker rejoins the front. The driver
ends when the front does, or on SIGTERM / Ctrl-C: the front drains (bounded), the actors stop
(bounded), the placement group goes, Ray is left (bounded). A map without `front` points the
workers at a front started elsewhere (`--front HOST:PORT`, nothing after `--`).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from afdserve.errors import UserInputError
from afdserve.launch.ray_launcher import (
    STRATEGIES,
    RayGroupConfig,
    die_with_parent,
    import_ray,
    node_address,
    shutdown,
    start_group,
    wait_process,
)
from afdserve.launch.roles import RoleMap
from afdserve.launch.torchrun_cli import DEFAULT_FRONT_PORT, _checked_serve_flags

POLL_S = 2.0
"""How often the driver looks at its front and its actors."""


@dataclass(frozen=True)
class DriverPlan:
    """What the driver does: the Ray group's config, where the workers find the front, and the
    front's `afdserve serve` flags (empty: the front runs elsewhere)."""

    group: RayGroupConfig
    address: str
    node_ip: str
    front_port: int | None
    front: str
    serve: tuple[str, ...]
    connect_timeout_s: float
    shutdown_timeout_s: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m afdserve.launch.ray",
        description="run one AFD group whose workers are Ray actors in a placement group "
        "(Ray places and restarts them; activations stay on afdserve's transports)",
    )
    p.add_argument(
        "--roles",
        required=True,
        metavar="SPEC",
        help="the group, e.g. front,attention:2,ffn:1 (front: run here; without it give --front)",
    )
    p.add_argument(
        "--address",
        default="",
        help="the Ray cluster (HOST:PORT of `ray start --head`, or auto); default: start a "
        "local one on --node-ip",
    )
    p.add_argument(
        "--node-ip",
        default="",
        help="this host's address, which the front binds and the workers reach (default: "
        "127.0.0.1 for a local cluster, else Ray's address of this node)",
    )
    p.add_argument("--front-port", type=int, default=DEFAULT_FRONT_PORT, metavar="PORT")
    p.add_argument(
        "--front", default="", metavar="HOST:PORT", help="a front started elsewhere (no front role)"
    )
    p.add_argument("--attention-cpus", type=float, default=1.0, help="CPUs per attention bundle")
    p.add_argument("--ffn-cpus", type=float, default=1.0, help="CPUs per FFN bundle")
    p.add_argument("--attention-gpus", type=float, default=0.0, help="GPUs per attention bundle")
    p.add_argument("--ffn-gpus", type=float, default=0.0, help="GPUs per FFN bundle")
    p.add_argument(
        "--attention-resource",
        default="",
        metavar="NAME",
        help="a custom resource each attention bundle also asks one unit of (pins attention "
        "workers to nodes started with `ray start --resources '{\"NAME\": N}'`)",
    )
    p.add_argument("--ffn-resource", default="", metavar="NAME", help="the same for FFN bundles")
    p.add_argument("--strategy", default="PACK", choices=STRATEGIES)
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="Ray restarts of each worker's actor (-1: without end; default %(default)s)",
    )
    p.add_argument(
        "--ray-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="the bound of every wait on Ray: the bundles' resources, the actors' start",
    )
    p.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="a local cluster's CPUs (default: what the bundles ask)",
    )
    p.add_argument("--worker-connect-timeout", type=float, default=60.0, metavar="S")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S")
    p.add_argument(
        "serve", nargs=argparse.REMAINDER, help="-- then the front's `afdserve serve` flags"
    )
    return p


def plan(argv: list[str]) -> DriverPlan:
    """The driver's plan from its flags, all checked before Ray is touched (no side effects)."""
    args = build_parser().parse_args(argv)
    roles = RoleMap.parse(args.roles)
    group = RayGroupConfig(
        roles=roles,
        attention_cpus=args.attention_cpus,
        ffn_cpus=args.ffn_cpus,
        attention_gpus=args.attention_gpus,
        ffn_gpus=args.ffn_gpus,
        attention_resource=args.attention_resource,
        ffn_resource=args.ffn_resource,
        strategy=args.strategy,
        max_restarts=args.max_restarts,
        timeout_s=args.ray_timeout,
    )
    for name in ("worker_connect_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be > 0")
    if args.num_cpus is not None and (args.address or not args.num_cpus > 0):
        raise UserInputError("--num-cpus (> 0) is for a local cluster only (no --address)")
    serve = args.serve[1:] if args.serve[:1] == ["--"] else args.serve
    node_ip = args.node_ip or ("" if args.address else "127.0.0.1")
    if roles.front_rank is None:
        if not args.front:
            raise UserInputError("--roles has no front: say where it runs with --front HOST:PORT")
        if serve:
            raise UserInputError("flags after -- are the front's; this driver runs no front")
        from afdserve.transport.options import parse_host_port

        parse_host_port(args.front, "--front")
        return DriverPlan(
            group, args.address, node_ip, None, args.front, (), args.worker_connect_timeout,
            args.shutdown_timeout,
        )  # fmt: skip
    if args.front:
        raise UserInputError("--roles runs the front here: drop --front (or `front` from --roles)")
    if not 0 < args.front_port < 65536:
        raise UserInputError(f"--front-port must be in 1..65535, got {args.front_port}")
    # the address is completed once Ray says this node's (`run`); the flags are checked now
    _checked_serve_flags(list(serve), roles, f"{node_ip or '127.0.0.1'}:{args.front_port}")
    return DriverPlan(
        group, args.address, node_ip, args.front_port, "", tuple(serve),
        args.worker_connect_timeout, args.shutdown_timeout,
    )  # fmt: skip


def _local_cpus(p: DriverPlan, num_cpus: float | None) -> float:
    if num_cpus is not None:
        return num_cpus
    r, m = p.group.roles.attention_workers, p.group.roles.ffn_workers
    return r * p.group.attention_cpus + m * p.group.ffn_cpus


def run(p: DriverPlan, num_cpus: float | None = None) -> int:
    ray = import_ray()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    if p.address:
        ray.init(address=p.address, log_to_driver=True)
    else:
        ray.init(
            _node_ip_address=p.node_ip,
            include_dashboard=False,
            num_cpus=_local_cpus(p, num_cpus),
            num_gpus=0 if not (p.group.attention_gpus or p.group.ffn_gpus) else None,
        )
    # after ray.init, which installs its own SIGTERM handler (a crash report, then exit)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    front_proc: subprocess.Popen | None = None
    group = None
    try:
        node_ip = p.node_ip or node_address(ray)
        if p.front_port is not None:
            front = f"{node_ip}:{p.front_port}"
            serve = _checked_serve_flags(list(p.serve), p.group.roles, front)
            front_proc = subprocess.Popen(
                [sys.executable, "-m", "afdserve.cli", "serve", *serve],
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # drains if we die
            )
            print(
                f"afdserve ray: the front runs here (pid {front_proc.pid}) at {front}", flush=True
            )
        else:
            front = p.front
        group = start_group(p.group, front, connect_timeout_s=p.connect_timeout_s)
        for rank, i in enumerate(group.infos()):
            if i is not None:
                print(f"afdserve ray: worker {rank} pid {i['pid']} on {i['host']}", flush=True)
        code = 0
        while not stop.wait(POLL_S):
            if front_proc is not None and front_proc.poll() is not None:
                code = front_proc.returncode
                print(f"afdserve ray: the front exited with code {code}", flush=True)
                break
        return code
    finally:
        if front_proc is not None:
            wait_process(front_proc, p.shutdown_timeout_s)
        if group is not None:
            group.close(min(p.shutdown_timeout_s, 15.0))
        if not shutdown(ray, 15.0):
            print("afdserve ray: ray.shutdown did not return within 15 s; leaving", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        p = plan(argv)
        num_cpus = build_parser().parse_args(argv).num_cpus
        return run(p, num_cpus)
    except UserInputError as exc:
        print(f"afdserve.launch.ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
