"""Rendezvous: how the ranks of a group find each other before any data moves.

A torch.distributed TCPStore at the group's HOST:PORT, hosted by rank 0 or, when the group has
a front that outlives its workers (launch/multiproc.py), by that front (`StoreServer`, and the
transports' `external_store` option); every rank connects to it, publishes what its peers need
(a ZeroMQ address, NIXL agent metadata) and reads theirs. Every read has a deadline. The store
only serves setup; a rank releases it when its transport closes.
"""

from __future__ import annotations

import datetime
import time

from afdserve.errors import TransportTimeout, UserInputError
from afdserve.transport.options import parse_host_port


class Rendezvous:
    """Keys live under `namespace/`, so several transports of one group can share a store."""

    def __init__(
        self,
        address: str,
        rank: int,
        world_size: int,
        timeout_s: float,
        namespace: str,
        host_store: bool = True,
    ) -> None:
        """`host_store`: rank 0 hosts the store (False: someone else does, e.g. the front)."""
        import torch.distributed as dist

        if not address:
            raise UserInputError("this transport needs `rendezvous` (HOST:PORT of rank 0's store)")
        self.host, self.port = parse_host_port(address)
        self.rank = rank
        self.world_size = world_size
        self.namespace = namespace
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(
                self.host,
                self.port,
                world_size,
                is_master=host_store and rank == 0,
                timeout=timeout,
                wait_for_workers=False,
            )
        except RuntimeError as e:  # DistNetworkError / DistStoreError are RuntimeErrors
            if host_store and rank == 0:
                raise UserInputError(
                    f"rank 0 cannot host the rendezvous store at {address}: {e}"
                ) from None
            raise TransportTimeout(
                f"rank {rank} could not reach the rendezvous store at {address}: {e}"
            ) from None
        self.store = store
        self.prefixed = dist.PrefixStore(namespace, store)

    def publish(self, key: str, value: bytes) -> None:
        self.prefixed.set(key, value)

    def lookup(self, key: str, deadline: float) -> bytes:
        """The value of `key`, waiting for some rank to publish it until `deadline` (monotonic)."""
        # poll check() rather than wait(): a timed-out wait() logs C++ warnings on every miss
        delay = 0.001
        while not self.prefixed.check([key]):
            if time.monotonic() > deadline:
                raise TransportTimeout(
                    f"rank {self.rank}: nobody published {self.namespace}/{key} at {self.host}:{self.port} in time"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.prefixed.get(key)

    def close(self) -> None:
        self.prefixed = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


class StoreServer:
    """Hosts a group's rendezvous store outside the group (the front of worker processes,
    whose ranks then run with `external_store`): every worker is told one address, the
    front's, and no worker's host needs to be known in advance."""

    def __init__(self, address: str, world_size: int, timeout_s: float) -> None:
        import torch.distributed as dist

        host, port = parse_host_port(address)
        try:
            self.store = dist.TCPStore(
                host,
                port,
                world_size,
                is_master=True,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        except RuntimeError as e:
            raise UserInputError(f"cannot host the rendezvous store at {address}: {e}") from None

    def close(self) -> None:
        self.store = None
