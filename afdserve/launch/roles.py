"""Which rank of a launcher's world is which afdserve process: the role map.

torchrun, LeaderWorkerSet and Ray hand every process a rank in 0..W-1 and nothing more; an AFD
group needs one front, r attention workers and m FFN workers. `--roles front,attention:2,ffn:1`
says so in rank order (rank 0 the front, ranks 1-2 attention workers 0-1, rank 3 the FFN
worker), and each rank then knows its role, its index within the role, and the afdserve worker
rank it connects to its front as (attention k -> k, FFN j -> r + j, as `afdserve worker --rank`
counts). A map without `front` is for a front that runs outside the launcher's world.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from afdserve.errors import UserInputError

RoleName = Literal["front", "attention", "ffn"]
ROLE_NAMES: tuple[RoleName, ...] = ("front", "attention", "ffn")

_ENTRY = re.compile(r"(front|attention|ffn)(?::(\d+))?")


@dataclass(frozen=True)
class Role:
    """One rank's place: its role and its index among the ranks of that role."""

    name: RoleName
    index: int


@dataclass(frozen=True)
class RoleMap:
    """The role of every launcher rank, in rank order (validated: at most one front, at least
    one attention and one FFN worker)."""

    roles: tuple[Role, ...]

    def __post_init__(self) -> None:
        counts = {n: sum(1 for x in self.roles if x.name == n) for n in ROLE_NAMES}
        if counts["front"] > 1:
            raise UserInputError(f"--roles: one front at most, got {counts['front']}")
        if counts["attention"] < 1 or counts["ffn"] < 1:
            raise UserInputError(
                "--roles needs at least one attention and one FFN worker, got "
                f"{counts['attention']} attention and {counts['ffn']} FFN"
            )
        for n in ROLE_NAMES:  # indices 0..count-1 in rank order: what `parse` builds
            idx = [x.index for x in self.roles if x.name == n]
            if idx != list(range(len(idx))):
                raise UserInputError(f"--roles: {n} indices {idx} are not 0..{len(idx) - 1}")

    @classmethod
    def parse(cls, spec: str) -> RoleMap:
        """`front,attention:R,ffn:M` (entries in rank order, a count defaults to 1; an entry
        may repeat, e.g. `attention:1,ffn:1,attention:1` to put an FFN worker between)."""
        if not isinstance(spec, str) or not spec.strip():
            raise UserInputError("--roles is empty: say e.g. front,attention:2,ffn:1")
        roles: list[Role] = []
        seen = dict.fromkeys(ROLE_NAMES, 0)
        for raw in spec.split(","):
            entry = raw.strip()
            m = _ENTRY.fullmatch(entry)
            if m is None:
                raise UserInputError(
                    f"--roles entry {entry!r} is not front, attention[:N] or ffn[:N] (in {spec!r})"
                )
            name: RoleName = m.group(1)  # type: ignore[assignment]
            count = int(m.group(2) or 1)
            if count < 1 or (name == "front" and count != 1):
                raise UserInputError(f"--roles entry {entry!r}: a count must be >= 1 (front: 1)")
            for _ in range(count):
                roles.append(Role(name, seen[name]))
                seen[name] += 1
        return cls(tuple(roles))

    @classmethod
    def default(cls, world_size: int) -> RoleMap:
        """No `--roles`: rank 0 the front, the last rank the FFN worker, the rest attention."""
        if world_size < 3:
            raise UserInputError(
                f"a world of {world_size} ranks has no room for a front, an attention and an "
                "FFN worker: give --roles (e.g. attention:1,ffn:1 with the front outside)"
            )
        return cls.parse(f"front,attention:{world_size - 2},ffn:1")

    @property
    def world_size(self) -> int:
        return len(self.roles)

    @property
    def attention_workers(self) -> int:
        return sum(1 for x in self.roles if x.name == "attention")

    @property
    def ffn_workers(self) -> int:
        return sum(1 for x in self.roles if x.name == "ffn")

    @property
    def front_rank(self) -> int | None:
        """The launcher rank that runs the front (None: the front runs outside)."""
        return next((k for k, x in enumerate(self.roles) if x.name == "front"), None)

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise UserInputError(
                f"rank {rank} is outside the role map's {self.world_size} ranks ({self.describe()})"
            )
        return self.roles[rank]

    def worker_rank(self, rank: int) -> int:
        """The afdserve worker rank (`afdserve worker --rank`) of launcher rank `rank`:
        attention k is k, FFN j is r + j; the front has none."""
        x = self.role(rank)
        if x.name == "front":
            raise UserInputError(f"rank {rank} is the front, not a worker")
        return x.index if x.name == "attention" else self.attention_workers + x.index

    def describe(self) -> str:
        """One line: which ranks are which (for logs and errors)."""
        return ", ".join(
            f"{k}={x.name}" + ("" if x.name == "front" else str(x.index))
            for k, x in enumerate(self.roles)
        )
