"""A dead FFN worker met by any send of a step, the step's first (its sync) included, waits for
the front's Rejoin (StepInterrupted: the step runs again) instead of killing the attention
worker; with no front to ask, the transport's error stands."""

from __future__ import annotations

import pytest
import torch

from afdserve.afd.ffn_link import RemoteFFN, StepInterrupted
from afdserve.transport.base import PeerUnreachable


class _DeadPeer:
    """A transport whose every send finds the FFN rank gone."""

    rank = 0

    def __init__(self) -> None:
        self.sends = 0

    def send(self, dst, msg) -> None:
        self.sends += 1
        raise PeerUnreachable(f"rank {dst} is unreachable")


def _link(interrupted) -> tuple[RemoteFFN, _DeadPeer]:
    transport = _DeadPeer()
    link = RemoteFFN(transport, [1], timeout_s=2.0)
    link.interrupted = interrupted
    return link, transport


@pytest.mark.parametrize("at", ["sync", "activation"])
def test_a_dead_ffn_worker_interrupts_the_step_once_the_front_rejoins(at: str) -> None:
    asked = []

    def interrupted() -> bool:  # the front's Rejoin arrives on the second look
        asked.append(1)
        return len(asked) >= 2

    link, transport = _link(interrupted)
    with pytest.raises(StepInterrupted):
        if at == "sync":
            link.begin_step(7, [1], [[0]])
        else:
            link.submit(7, 3, 0, torch.zeros(1, 4))
    assert transport.sends == 1 and len(asked) == 2


def test_without_a_front_the_transport_error_stands() -> None:
    link, _ = _link(None)
    with pytest.raises(PeerUnreachable):
        link.begin_step(7, [1], [[0]])
    link, _ = _link(lambda: False)  # the front never says the FFN side is rebuilt
    link.timeout_s = 0.05
    with pytest.raises(PeerUnreachable):
        link.begin_step(7, [1], [[0]])
