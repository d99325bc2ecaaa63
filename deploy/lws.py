"""Render a LeaderWorkerSet manifest for one afdserve rA:mF group per LWS replica.

    python deploy/lws.py --image IMAGE --model MODEL --attention 2 --ffn 1 > deploy/afdserve-lws.yaml

The group is 1 + r + m pods: the leader (LWS_WORKER_INDEX 0) is the front, worker pods 1..r the
attention workers and r+1..r+m the FFN workers, by the same role map torchrun uses
(`python -m afdserve.launch.torchrun --roles front,attention:R,ffn:M`, which reads LWS's
LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX). Choices, and why:
- `restartPolicy: None` (LWS's default): a dead container is restarted in place by the kubelet
  and its worker rejoins the front (multiproc.py's membership path), its requests moving to the
  other attention workers meanwhile; `RecreateGroupOnPodRestart` (--restart-policy, what
  llm-d uses for engines that cannot lose a peer) recreates every pod of the group, the front
  and its in-flight requests included;
- readiness of the leader from `/health` (503 while no attention worker serves, so a Service
  sends nothing to a group that cannot answer); liveness from `/version`, which answers while
  the HTTP server runs whatever the workers do: a front waiting for restarted workers is
  recovering, not dead. Workers get no liveness probe: a worker that dies ends its container
  anyway, and one that stalls is the front's to detect (its requests move within 1.5 s); a
  probe could only kill one mid-recovery (waiting for a restarted FFN worker, say);
- a startup probe gives the front --startup-timeout to load and gather its workers;
- every pod advertises its pod IP ($AFDSERVE_HOST from the downward API) to its peers.

Needs PyYAML (installed with the test extras). The test (tests/launch/test_deploy_lws.py)
renders this and checks every flag against afdserve's own argparse parsers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FRONT_PORT = 29600
HTTP_PORT = 8000
ENTRY = ["python", "-m", "afdserve.launch.torchrun"]


def group_command(args: argparse.Namespace) -> list[str]:
    """The one command line of every pod of a group (the role map picks each pod's part)."""
    roles = f"front,attention:{args.attention},ffn:{args.ffn}"
    return [
        *ENTRY,
        "--roles",
        roles,
        "--front-port",
        str(FRONT_PORT),
        "--worker-connect-timeout",
        str(args.startup_timeout),
        "--",
        "--model",
        args.model,
        "--transport",
        args.transport,
        "--host",
        "0.0.0.0",
        "--port",
        str(HTTP_PORT),
        "--startup-timeout",
        str(args.startup_timeout),
        *args.serve_arg,
    ]


def _pod_ip_env() -> list[dict[str, Any]]:
    return [{"name": "AFDSERVE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]


def _resources(cpus: int, memory_gib: int, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": amounts, "limits": amounts}


def manifest(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The LeaderWorkerSet and the Service in front of its leaders."""
    cmd = group_command(args)
    world = 1 + args.attention + args.ffn
    front_ports = [{"name": "http", "containerPort": HTTP_PORT}] + [
        {"name": f"afd-{k}", "containerPort": FRONT_PORT + k} for k in range(world + 1)
    ]  # events, one control port per worker, the rendezvous store
    probe_period = 5
    leader = {
        "metadata": {"labels": {"afdserve.role": "front"}},
        "spec": {
            "containers": [
                {
                    "name": "front",
                    "image": args.image,
                    "command": cmd,
                    "env": _pod_ip_env(),
                    "ports": front_ports,
                    "resources": _resources(args.front_cpus, args.front_memory_gib, 0),
                    "startupProbe": {
                        "httpGet": {"path": "/version", "port": HTTP_PORT},
                        "periodSeconds": probe_period,
                        "failureThreshold": int(args.startup_timeout // probe_period) + 1,
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": HTTP_PORT},
                        "periodSeconds": probe_period,
                        "failureThreshold": 1,
                    },
                    "livenessProbe": {
                        "httpGet": {"path": "/version", "port": HTTP_PORT},
                        "periodSeconds": 10,
                        "timeoutSeconds": 5,
                        "failureThreshold": 6,
                    },
                }
            ]
        },
    }
    worker = {
        "metadata": {"labels": {"afdserve.role": "worker"}},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": args.image,
                    "command": cmd,
                    "env": _pod_ip_env(),
                    "resources": _resources(args.worker_cpus, args.worker_memory_gib, args.gpus),
                }
            ]
        },
    }
    lws = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": args.name},
        "spec": {
            "replicas": args.replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": world,
                "restartPolicy": args.restart_policy,
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": args.name},
        "spec": {
            "selector": {  # LWS labels every pod with its set and index: 0 is the leader
                "leaderworkerset.sigs.k8s.io/name": args.name,
                "leaderworkerset.sigs.k8s.io/worker-index": "0",
            },
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT}],
        },
    }
    return [lws, service]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deploy/lws.py", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="afdserve")
    p.add_argument("--image", default="afdserve:latest")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--attention", type=int, default=2, metavar="R")
    p.add_argument("--ffn", type=int, default=1, metavar="M")
    p.add_argument("--replicas", type=int, default=1, help="groups (each 1 + R + M pods)")
    p.add_argument("--transport", default="tcp", choices=("tcp", "torch"))
    p.add_argument(
        "--restart-policy", default="None", choices=("None", "RecreateGroupOnPodRestart")
    )
    p.add_argument("--startup-timeout", type=int, default=600, metavar="S")
    p.add_argument("--front-cpus", type=int, default=2)
    p.add_argument("--front-memory-gib", type=int, default=4)
    p.add_argument("--worker-cpus", type=int, default=4)
    p.add_argument("--worker-memory-gib", type=int, default=16)
    p.add_argument("--gpus", type=int, default=0, help="GPUs per worker pod")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more `afdserve serve` flag or value for the front (repeatable)",
    )
    return p


def render(argv: list[str] | None = None) -> str:
    import yaml

    args = build_parser().parse_args(argv)
    if args.attention < 1 or args.ffn < 1 or args.replicas < 1:
        raise SystemExit("--attention, --ffn and --replicas must be >= 1")
    header = (
        "# Rendered by `python deploy/lws.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        + "`; edit that, not this.\n"
    )

    class NoAliases(yaml.SafeDumper):  # the same command twice is written out twice
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return header + yaml.dump_all(manifest(args), Dumper=NoAliases, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
