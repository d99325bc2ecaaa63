"""The messages AFD workers exchange: what a frame means, apart from how it is encoded.

Ranks: attention worker k has rank k (0..r-1); FFN worker j has rank r + j.

Workers, links and transports build and read `Message`s; only the codec (`protocol` for the
wire format, `codec` for the calls transports make) turns them into bytes and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class MsgType(enum.IntEnum):
    ACTIVATION_TRANSFER = 1  # A -> F: h after attention, one (step, layer, microbatch)
    ACTIVATION_RESULT = 2  # F -> A: the FFN output y for the same key
    SYNC_REQUEST = 3  # A -> F: a step's microbatch token counts and request ids
    SYNC_ACK = 4  # F -> A: the FFN accepted the step's plan
    HEARTBEAT = 5  # both ways: liveness
    SHUTDOWN = 6  # orderly stop
    ERROR = 7  # a peer reports it dropped or failed something
    ROUTING = 8  # A -> F (expert parallelism): int32 [N, k] expert ids of the ACTIVATION_TRANSFER
    # rows with the same key, -1 for a slot this FFN worker does not serve


@dataclass(frozen=True)
class SyncInfo:
    """SYNC_REQUEST payload: how many tokens each microbatch of this step carries, and for whom."""

    tokens_per_microbatch: tuple[int, ...]
    request_ids: tuple[tuple[int, ...], ...] = ()
    """Per microbatch, the sequence ids in it (the FFN side uses them for logging/metrics)."""

    @property
    def num_microbatches(self) -> int:
        return len(self.tokens_per_microbatch)


@dataclass(frozen=True, init=False)
class Message:
    """One frame. `tensor` is set for ACTIVATION_* frames, `sync` for SYNC_REQUEST."""

    type: MsgType
    step: int
    layer: int = 0
    microbatch: int = 0
    sender: int = 0
    tensor: torch.Tensor | None = None
    sync: SyncInfo | None = None
    text: str = ""
    """ERROR / SHUTDOWN reason, HEARTBEAT status."""

    def __init__(
        self,
        type: MsgType,
        step: int,
        layer: int = 0,
        microbatch: int = 0,
        sender: int = 0,
        tensor: torch.Tensor | None = None,
        sync: SyncInfo | None = None,
        text: str = "",
    ) -> None:
        # The generated frozen __init__ goes through object.__setattr__ once per field (1.5 us
        # per message); writing the instance dict directly costs well under half of that. The
        # instance stays frozen: attribute assignment still raises FrozenInstanceError.
        d = self.__dict__
        d["type"] = type
        d["step"] = step
        d["layer"] = layer
        d["microbatch"] = microbatch
        d["sender"] = sender
        d["tensor"] = tensor
        d["sync"] = sync
        d["text"] = text

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """What a receiver waits on: (sender, type, step, layer, microbatch)."""
        return (self.sender, int(self.type), self.step, self.layer, self.microbatch)
