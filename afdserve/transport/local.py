"""In-process transport: endpoints in one process hand messages over by reference.

It implements the same interface as the multi-process backends, so the attention and FFN worker
loops are the same code in-process (threads) and across processes.
"""

from __future__ import annotations

import torch

from afdserve.transport.base import Transport
from afdserve.transport.message import Message


class LocalHub:
    """Creates the endpoints of one in-process group and routes between them."""

    def __init__(self, world_size: int) -> None:
        if world_size < 2:
            raise ValueError(f"an AFD group needs at least 2 ranks, got {world_size}")
        self.endpoints = [LocalTransport(self, rank, world_size) for rank in range(world_size)]

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()


class LocalTransport(Transport):
    def __init__(self, hub: LocalHub, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self._hub = hub

    def carries(self, device: torch.device) -> bool:
        return True  # by reference: any device

    def send(self, dst: int, msg: Message) -> None:
        self._hub.endpoints[dst].mailbox.put(msg)
