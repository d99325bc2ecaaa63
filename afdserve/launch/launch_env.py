"""The rendezvous environment a standard launcher gives each process, read once and checked.

torchrun (torch.distributed.run) sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
GROUP_RANK and TORCHELASTIC_RESTART_COUNT in every worker it starts; a LeaderWorkerSet pod
gets LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX (0 for the leader). Either says
where this process stands in its world and where the host of rank 0 (the front, by the default
role map) is. Where both are set (torchrun inside LWS pods), torchrun's are the process's own.
A missing or malformed variable is a UserInputError naming it, never a KeyError deep inside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from afdserve.errors import UserInputError

Source = Literal["torchrun", "lws"]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands in its launcher's world."""

    source: Source
    rank: int
    world_size: int
    master_addr: str
    """Host of rank 0 (torchrun: MASTER_ADDR; LWS: the leader pod's address)."""
    master_port: int | None = None
    """torchrun's own store port (MASTER_PORT); afdserve never binds it. None under LWS."""
    local_rank: int = 0
    group_rank: int = 0
    """Which agent (node) of the world this is (torchrun's GROUP_RANK; LWS: the pod's index)."""
    restart_count: int = 0
    """How many times the launcher restarted this rank's group (TORCHELASTIC_RESTART_COUNT)."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UserInputError(f"the world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise UserInputError(f"rank {self.rank} is outside a world of {self.world_size}")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise UserInputError(f"the address of rank 0 is not a host: {self.master_addr!r}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UserInputError(f"MASTER_PORT must be in 1..65535, got {self.master_port}")
        for name, v in (
            ("LOCAL_RANK", self.local_rank),
            ("GROUP_RANK", self.group_rank),
            ("TORCHELASTIC_RESTART_COUNT", self.restart_count),
        ):
            if v < 0:
                raise UserInputError(f"{name} must be >= 0, got {v}")

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if env is None else env
        if "RANK" in env or "WORLD_SIZE" in env:
            return cls(
                source="torchrun",
                rank=_int(env, "RANK"),
                world_size=_int(env, "WORLD_SIZE"),
                master_addr=_str(env, "MASTER_ADDR"),
                master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
                local_rank=_int(env, "LOCAL_RANK", 0),
                group_rank=_int(env, "GROUP_RANK", 0),
                restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            )
        if any(k.startswith("LWS_") for k in env):
            index = _int(env, "LWS_WORKER_INDEX")
            return cls(
                source="lws",
                rank=index,
                world_size=_int(env, "LWS_GROUP_SIZE"),
                master_addr=_str(env, "LWS_LEADER_ADDRESS"),
                group_rank=index,
            )
        raise UserInputError(
            "not started by a launcher: neither torchrun's RANK/WORLD_SIZE/MASTER_ADDR nor "
            "LeaderWorkerSet's LWS_WORKER_INDEX/LWS_GROUP_SIZE/LWS_LEADER_ADDRESS are set "
            "(to start workers by hand, use `afdserve worker --front HOST:PORT --rank K`)"
        )


def _str(env: Mapping[str, str], name: str) -> str:
    v = env.get(name)
    if v is None or not v.strip():
        raise UserInputError(f"{name} is not set (the launcher sets it)")
    return v.strip()


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise UserInputError(f"{name} is not set (the launcher sets it)")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise UserInputError(f"{name}={raw!r} is not an integer") from None
