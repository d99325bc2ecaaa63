"""One entry point for every rank a standard launcher starts: torchrun or a LeaderWorkerSet pod.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --max-restarts 3 -m afdserve.launch.torchrun --roles front,attention:2,ffn:1 \\
        -- --model builtin:tiny-llama --port 8000

Each rank reads its place from the launcher's environment (launch_env.py), its role from the
role map (roles.py), and becomes what the role says:
- the front rank runs `afdserve serve --front HOST:PORT --attention-workers R --ffn-workers M`
  with the flags after `--` (the front that waits for workers started elsewhere). Under
  torchrun it does so through a keeper (front_lease.py), so that the agent restarting its node's
  processes does not take the front and its HTTP clients with them; under LWS (a container
  restart ends every process anyway) it execs the front itself;
- every other rank execs `afdserve worker --front HOST:PORT --rank K --host ADDR`: the worker
  the front configures, as one started by hand. When torchrun's agent restarts it
  (`--max-restarts`), the new process says hello and the front takes it back (multiproc.py's
  membership path), with every other worker restarted at the same moment, under one epoch.

The front's address is the host of rank 0 (MASTER_ADDR, LWS_LEADER_ADDRESS) at --front-port,
so the default map puts the front at rank 0; `--front HOST:PORT` names any other place,
including a front started outside the launcher (a map without `front`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from afdserve.errors import UserInputError
from afdserve.launch.launch_env import LaunchEnv
from afdserve.launch.roles import RoleMap

DEFAULT_FRONT_PORT = 29600
"""The front's events port on the host of rank 0 (its control ports and rendezvous store
follow it: PORT+1 .. PORT+1+r+m); torchrun's own store keeps MASTER_PORT (29500 by default)."""

TRANSPORTS = ("tcp", "torch")
"""Data transports that cross hosts and rejoin a restarted worker (shm is one host's; nixl's
agents have not been tried across a restart)."""

DEFAULT_LEASE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RankPlan:
    """What one launcher rank runs: `argv` (exec'd; for the front, the `afdserve serve` flags
    its keeper starts it with)."""

    role: str
    argv: tuple[str, ...]
    front: str
    keep_front: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m afdserve.launch.torchrun",
        description="run the rank a launcher (torchrun, LeaderWorkerSet) started as the front, "
        "an attention worker or an FFN worker of one AFD group",
    )
    p.add_argument(
        "--roles",
        default=None,
        metavar="SPEC",
        help="ranks in order, e.g. front,attention:2,ffn:1 (default: rank 0 the front, the last "
        "rank the FFN worker, the rest attention workers)",
    )
    p.add_argument(
        "--front",
        default="",
        metavar="HOST:PORT",
        help="where the front is (default: the host of rank 0 at --front-port)",
    )
    p.add_argument("--front-port", type=int, default=DEFAULT_FRONT_PORT, metavar="PORT")
    p.add_argument(
        "--host",
        default="",
        help="address peers reach this worker at (default: $AFDSERVE_HOST, else the local "
        "address that routes to rank 0's host)",
    )
    p.add_argument(
        "--run-dir",
        default="",
        metavar="DIR",
        help="the front keeper's pid, lease and log files (default: a directory in the "
        "system's temporary directory named after the front port)",
    )
    p.add_argument(
        "--lease-timeout",
        type=float,
        default=DEFAULT_LEASE_TIMEOUT_S,
        metavar="S",
        help="the front stops once no keeper has renewed its lease for S seconds (the launcher "
        "ended); must exceed the launcher's restart time (default %(default)s)",
    )
    p.add_argument(
        "--worker-connect-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a worker's deadline for its front's configuration and its data connections",
    )
    p.add_argument(
        "serve", nargs=argparse.REMAINDER, help="-- then the front's `afdserve serve` flags"
    )
    return p


def _serve_flags(raw: list[str]) -> list[str]:
    return raw[1:] if raw[:1] == ["--"] else raw


def _front_address(args: argparse.Namespace, env: LaunchEnv, roles: RoleMap) -> str:
    """HOST:PORT the workers reach the front at (a name is kept: ZeroMQ resolves it)."""
    if args.front:
        from afdserve.transport.options import parse_host_port

        parse_host_port(args.front, "--front")
        return args.front
    if roles.front_rank is None:
        raise UserInputError("--roles has no front: say where it runs with --front HOST:PORT")
    if roles.front_rank != 0:
        raise UserInputError(
            f"the front is rank {roles.front_rank}, whose host the environment does not name: "
            "put it at rank 0 or give --front HOST:PORT"
        )
    if not 0 < args.front_port < 65536:
        raise UserInputError(f"--front-port must be in 1..65535, got {args.front_port}")
    return f"{env.master_addr}:{args.front_port}"


def _front_bind(args: argparse.Namespace, front: str, environ) -> str:
    """HOST:PORT the front itself binds (and tells its workers the rendezvous store at): this
    host's own address when --host or $AFDSERVE_HOST says it (a pod binds its IP before its DNS
    name resolves), else the front's address with the name resolved (ZeroMQ binds addresses)."""
    host, _, port = front.rpartition(":")
    if args.front:
        return front
    own = args.host or environ.get("AFDSERVE_HOST", "")
    return f"{own or _resolve(host)}:{port}"


def _resolve(host: str) -> str:
    """An IP address for `host` (the front binds it, and ZeroMQ binds addresses, not names)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise UserInputError(f"cannot resolve the host of rank 0, {host!r}: {exc}") from None


def _local_address(toward: str) -> str:
    """The address of this host's interface that routes to `toward` (a UDP connect sends
    nothing; it only picks the route)."""
    if ipaddress.ip_address(toward).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((toward, 9))
        except OSError as exc:
            raise UserInputError(
                f"no route to the front's host {toward}: give --host ({exc})"
            ) from None
        return s.getsockname()[0]


def _checked_serve_flags(serve: list[str], roles: RoleMap, front: str) -> list[str]:
    """The front's flags, parsed by `afdserve serve`'s own parser (a bad flag fails on every
    rank at once, not only on the front's); the group's shape and the front's address come
    from the role map and may not be given again differently."""
    from afdserve.cli import build_parser as cli_parser

    parser = cli_parser()
    try:
        ns = parser.parse_args(["serve", *serve])
    except SystemExit:
        raise UserInputError(f"the flags after -- are not `afdserve serve`'s: {serve}") from None
    defaults = parser.parse_args(["serve"])
    for dest, want, flag in (
        ("attention_workers", roles.attention_workers, "--attention-workers"),
        ("ffn_workers", roles.ffn_workers, "--ffn-workers"),
    ):
        got = getattr(ns, dest)
        if got != getattr(defaults, dest) and got != want:
            raise UserInputError(f"{flag} {got} disagrees with --roles ({roles.describe()})")
    if ns.max_attention_workers not in (0, roles.attention_workers):
        raise UserInputError(
            "--max-attention-workers: a launched group's ranks are fixed by --roles, so it "
            "has no free attention slot to add workers in (use `afdserve serve --front` and "
            "start the workers yourself)"
        )
    if ns.front:
        raise UserInputError("give the front's address to this launcher (--front), not after --")
    if ns.mode != "afd":
        raise UserInputError("a launched group runs AFD: drop --mode aggregated")
    out = list(serve)
    if "--transport" not in serve and not any(a.startswith("--transport=") for a in serve):
        out += ["--transport", "tcp"]
    elif ns.transport not in TRANSPORTS:
        raise UserInputError(
            f"--transport {ns.transport} does not cross hosts and rejoin a restarted worker: "
            f"use one of {', '.join(TRANSPORTS)}"
        )
    out += [
        "--attention-workers",
        str(roles.attention_workers),
        "--ffn-workers",
        str(roles.ffn_workers),
    ]
    return out + ["--front", front]


def plan(argv: list[str], environ: dict[str, str] | None = None) -> RankPlan:
    """What this rank runs, from its flags and environment (no side effects: tested alone)."""
    args = build_parser().parse_args(argv)
    env = LaunchEnv.from_environ(environ)
    roles = RoleMap.parse(args.roles) if args.roles else RoleMap.default(env.world_size)
    if roles.world_size != env.world_size:
        raise UserInputError(
            f"--roles names {roles.world_size} ranks ({roles.describe()}) but the launcher "
            f"started {env.world_size} (WORLD_SIZE / LWS_GROUP_SIZE)"
        )
    if not args.lease_timeout > 0:
        raise UserInputError(f"--lease-timeout must be > 0, got {args.lease_timeout}")
    environ = os.environ if environ is None else environ
    front = _front_address(args, env, roles)
    role = roles.role(env.rank)
    if role.name == "front":
        bind = _front_bind(args, front, environ)
        serve = _checked_serve_flags(_serve_flags(args.serve), roles, bind)
        return RankPlan("front", tuple(serve), bind, keep_front=env.source == "torchrun")
    _checked_serve_flags(_serve_flags(args.serve), roles, front)  # every rank fails alike
    front_host = front.rpartition(":")[0]
    host = args.host or environ.get("AFDSERVE_HOST", "") or _local_address(_resolve(front_host))
    if not args.worker_connect_timeout > 0:
        raise UserInputError("--worker-connect-timeout must be > 0")
    worker = (
        "worker",
        "--front",
        front,
        "--rank",
        str(roles.worker_rank(env.rank)),
        "--host",
        host,
        "--connect-timeout-s",
        str(args.worker_connect_timeout),
    )
    return RankPlan(f"{role.name}{role.index}", worker, front)


def _run_dir(args_run_dir: str, front: str) -> Path:
    if args_run_dir:
        return Path(args_run_dir)
    port = front.rpartition(":")[2]
    return Path(tempfile.gettempdir()) / f"afdserve-front-{port}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        p = plan(argv)
    except UserInputError as exc:
        print(f"afdserve.launch.torchrun: error: {exc}", file=sys.stderr)
        return 2
    env = LaunchEnv.from_environ()
    print(
        f"afdserve.launch.torchrun: rank {env.rank}/{env.world_size} ({env.source}, restart "
        f"{env.restart_count}) is {p.role}, front {p.front}",
        flush=True,
    )
    if p.role == "front" and p.keep_front:
        from afdserve.launch.front_lease import keep_front

        args = build_parser().parse_args(argv)
        return keep_front(_run_dir(args.run_dir, p.front), list(p.argv), args.lease_timeout)
    cmd = [
        sys.executable,
        "-m",
        "afdserve.cli",
        *(("serve",) if p.role == "front" else ()),
        *p.argv,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)  # the launcher watches this very process
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
