"""Options every multi-process transport takes, validated once with clear messages.

A launcher builds one endpoint per worker process with the same group-wide options (rendezvous
address, timeouts) and the worker's own rank; see registry.create_transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from afdserve.errors import ProtocolError, UserInputError
from afdserve.transport.protocol import HEADER_SIZE, MAX_FRAME_BYTES, MAX_TEXT_BYTES


def parse_host_port(value: str, what: str = "rendezvous") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with a UserInputError naming `what` on bad input."""
    if not isinstance(value, str) or ":" not in value:
        raise UserInputError(f"{what} must be HOST:PORT, got {value!r}")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise UserInputError(f"{what} must be HOST:PORT with a host, got {value!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise UserInputError(f"{what} port must be an integer, got {port_s!r}") from None
    if not 0 < port < 65536:
        raise UserInputError(f"{what} port must be in 1..65535, got {port}")
    return host, port


LOW_PORT = 10000
"""free_port picks from [LOW_PORT, the kernel's first ephemeral port)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, chosen outside the kernel's ephemeral range.

    Whoever asks binds it only later (a worker, seconds after the front chose it). A port of
    the ephemeral range may be taken meanwhile by any socket on the host that binds port 0 or
    connects (gloo opens dozens): "Address already in use" in the tests, now and then. Below
    that range only another explicit choice can collide."""
    import random
    import socket

    lo = ephemeral_low()
    for _ in range(200 if lo > LOW_PORT + 1000 else 0):
        port = random.randint(LOW_PORT, lo - 1)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(n: int, host: str = "127.0.0.1") -> int:
    """A port P with P .. P + n - 1 all free on `host` now, below the ephemeral range (as
    `free_port`): what a front of workers started by hand binds (`--front HOST:P`)."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(LOW_PORT, ephemeral_low() - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports on {host}")


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    elif (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value > 0 and math.isfinite(value))
    ):
        raise UserInputError(f"{name} must be a positive number, got {value!r}")


DEFAULT_MAX_FRAME_BYTES = 1 << 30
"""1 GiB. The largest frame AFD sends is one microbatch's hidden states, tokens x hidden size x
itemsize: 8192 tokens x 8192 (a 70B-class model) x 4 bytes (float32) is 256 MiB, so this leaves
4x headroom; a deployment with larger steps raises `max_frame_bytes`."""
MIN_FRAME_BYTES = 64 << 10
"""max_frame_bytes may not go below this: every control frame (header and a full text) fits."""
MIN_AUTH_KEY_BYTES = 16


@dataclass(frozen=True)
class TransportOptions:
    """What every backend needs besides rank and world size."""

    rendezvous: str = ""
    """HOST:PORT of the group's rendezvous TCPStore, hosted by rank 0 (torch, tcp, nixl). The shm
    backend only derives its session name from it (no TCP); it can be given `session` instead."""
    external_store: bool = False
    """The store at `rendezvous` is hosted outside the group (by the front: StoreServer), not
    by rank 0."""
    peers: tuple[int, ...] | None = None
    """Ranks this endpoint exchanges messages with; None means every other rank. Must be
    symmetric across the group (attention ranks list the FFN ranks and vice versa)."""
    connect_timeout_s: float = 60.0
    """Deadline for the constructor: every peer must be reachable by then (TransportTimeout)."""
    send_timeout_s: float = 30.0
    """Longest `send` blocks on back-pressure (full ring or queue) before TransportTimeout."""
    epoch: int = 0
    """The group's incarnation: after a worker is restarted, every rank connects again under a
    new epoch, so no endpoint, ring or rendezvous key of the old group mixes with the new
    one (launch/multiproc.py's FFN recovery)."""
    spin_s: float = 20e-6
    """shm, tcp, nixl: how long a waiting `recv` polls before it sleeps until woken. A reply
    that comes within this time skips a sleep and a wake-up (tens of microseconds); a wait
    that lasts longer costs this much CPU. 0 never spins."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """The longest frame (header, text and payload) this endpoint takes in. A longer one is
    dropped before any of its bytes are allocated for it (tcp: libzmq closes the connection of a
    ZeroMQ part above it, ZMQ_MAXMSGSIZE), and `send` refuses one with ProtocolError, since the
    group's peers, which share the options, would drop it. See DEFAULT_MAX_FRAME_BYTES."""
    auth_key: bytes = field(default=b"", repr=False)
    """The group's secret (the front draws one per group and sends it in `Configure`). tcp
    proves it on every connection's handshake (transport/tcp_handshake.py) and refuses
    connections that cannot; empty: connections are bound to the rank they claim, unproven.
    The other backends do not use it (docs/protocol.md, "Trust"). Never printed (repr=False)."""

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise UserInputError(f"epoch must be an integer >= 0, got {self.epoch!r}")
        if self.rendezvous:
            parse_host_port(self.rendezvous)
        if self.peers is not None:
            peers = tuple(self.peers)
            for p in peers:
                if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                    raise UserInputError(f"peers must be non-negative ranks, got {p!r}")
            if len(set(peers)) != len(peers):
                raise UserInputError(f"peers must not repeat a rank, got {peers}")
            object.__setattr__(self, "peers", peers)
        check_positive("connect_timeout_s", self.connect_timeout_s)
        check_positive("send_timeout_s", self.send_timeout_s)
        if (
            isinstance(self.spin_s, bool)
            or not isinstance(self.spin_s, (int, float))
            or not 0 <= self.spin_s <= 1
        ):
            raise UserInputError(
                f"spin_s must be a number of seconds in [0, 1], got {self.spin_s!r}"
            )
        m = self.max_frame_bytes
        if (
            isinstance(m, bool)
            or not isinstance(m, int)
            or not MIN_FRAME_BYTES <= m <= MAX_FRAME_BYTES
        ):
            raise UserInputError(
                f"max_frame_bytes must be an integer in [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}] "
                f"(a header and a {MAX_TEXT_BYTES}-byte text are {HEADER_SIZE + MAX_TEXT_BYTES}), "
                f"got {m!r}"
            )
        key = self.auth_key
        if not isinstance(key, bytes) or 0 < len(key) < MIN_AUTH_KEY_BYTES:
            raise UserInputError(
                f"auth_key must be bytes, empty or at least {MIN_AUTH_KEY_BYTES} long "
                f"(got {type(key).__name__} of length {len(key) if isinstance(key, bytes) else '-'})"
            )

    def check_frame_len(self, n: int, dst: int) -> None:
        """ProtocolError for a frame of `n` bytes longer than the group's receivers take: sent,
        it would be dropped and its receiver would wait out its deadline instead."""
        if n > self.max_frame_bytes:
            raise ProtocolError(
                f"a frame of {n} bytes for rank {dst} exceeds max_frame_bytes "
                f"({self.max_frame_bytes}), which its receiver would drop it for: raise "
                "max_frame_bytes for the group, or send smaller microbatches"
            )

    def peer_ranks(self, rank: int, world_size: int) -> tuple[int, ...]:
        """The validated peer list for `rank` in a group of `world_size`."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
            raise UserInputError(f"world_size must be an integer >= 2, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UserInputError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if self.peers is None:
            return tuple(r for r in range(world_size) if r != rank)
        for p in self.peers:
            if p >= world_size or p == rank:
                raise UserInputError(
                    f"peer {p} of rank {rank} is not another rank of a group of {world_size}"
                )
        if not self.peers:
            raise UserInputError(f"rank {rank} has no peers")
        return tuple(sorted(self.peers))


def afd_peers(rank: int, num_attention: int, num_ffn: int = 1) -> tuple[int, ...]:
    """Who talks to whom in AFD: attention ranks 0..r-1 talk to FFN ranks r..r+m-1 and back."""
    if num_attention < 1 or num_ffn < 1:
        raise UserInputError(
            f"need >= 1 attention and FFN worker, got {num_attention} and {num_ffn}"
        )
    world = num_attention + num_ffn
    if not 0 <= rank < world:
        raise UserInputError(f"rank must be in 0..{world - 1}, got {rank}")
    if rank < num_attention:
        return tuple(range(num_attention, world))
    return tuple(range(num_attention))
