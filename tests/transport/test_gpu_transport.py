"""GPU tensors over every multi-process backend (needs CUDA; skipped without it).

Host transports (shm, tcp, torch/gloo) carry a CUDA tensor through host memory: it arrives as an
equal host tensor. nixl with VRAM slots moves it GPU to GPU: a streamed tensor arrives on the
GPU, and every byte must survive the device copies into and out of the registered slots (which
are only safe with the synchronisation around the NIXL writes).
"""

from __future__ import annotations

import pytest
import torch

from .conftest import Group, backend_options, free_port, skip_unless_available
from .peer_main import key_of

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((4, 8), (0, 16), (300, 1024), (1, 70_000))  # up to 280 KB: many 64 KB slots' worth


def _cuda_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(s, generator=g) * 100).to(dt).cuda() for dt in DTYPES for s in SHAPES]


@pytest.fixture
def gpu_group():
    groups: list[Group] = []

    def make(backend: str, r: int, **extra) -> Group:
        skip_unless_available(backend)
        opts = backend_options(backend, f"127.0.0.1:{free_port()}") | extra
        g = Group(backend, r, opts)
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.cleanup()


def _echo(g: Group, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Send each tensor to every peer (steps 1..n), collect the echoes; returns them in order."""
    from afdserve.transport.message import Message, MsgType, SyncInfo

    tr = g.transport
    for peer in range(g.r):
        tr.send(
            peer, Message(MsgType.SYNC_REQUEST, 0, sender=tr.rank, sync=SyncInfo((1,), ((1,),)))
        )
    for peer in range(g.r):
        tr.recv(peer, MsgType.SYNC_ACK, 0, timeout_s=60)
    for step, x in enumerate(tensors, start=1):
        layer, mb = key_of(step)
        for peer in range(g.r):
            tr.send(peer, Message(MsgType.ACTIVATION_TRANSFER, step, layer, mb, tr.rank, tensor=x))
    got = []
    for step in range(1, len(tensors) + 1):
        layer, mb = key_of(step)
        for peer in range(g.r):
            got.append(
                tr.recv(peer, MsgType.ACTIVATION_RESULT, step, layer, mb, timeout_s=60).tensor
            )
    stop = len(tensors) + 1
    layer, mb = key_of(stop)
    for peer in range(g.r):
        tr.send(peer, Message(MsgType.ACTIVATION_TRANSFER, stop, layer, mb, tr.rank,
                              tensor=torch.zeros(0), text="stop"))  # fmt: skip
    for rc, out, err in g.wait_peers():
        assert rc == 0, f"{g.backend} peer failed ({rc}):\n{out}\n{err}"
    return got


@pytest.mark.parametrize("backend", ["shm", "tcp", "torch"])
def test_host_transports_stage_cuda_tensors(gpu_group, backend):
    g = gpu_group(backend, r=1)
    g.start()
    assert not g.transport.carries(torch.device("cuda"))
    tensors = _cuda_tensors()
    got = _echo(g, tensors)
    for x, y in zip(tensors, got, strict=True):
        assert y.device.type == "cpu" and y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(y, x.cpu()), f"{backend}: {x.dtype}{tuple(x.shape)} changed"


def test_nixl_vram_slots_move_gpu_tensors_in_place(gpu_group):
    g = gpu_group("nixl", r=2, device="cuda")
    g.start()
    assert g.transport.carries(torch.device("cuda"))
    assert g.transport._rx.is_cuda and g.transport._tx.is_cuda
    tensors = _cuda_tensors() + [torch.arange(5000, dtype=torch.float32)]  # a host tensor too
    got = _echo(g, tensors)
    for i, x in enumerate(tensors):
        for y in got[2 * i : 2 * i + 2]:
            assert y.dtype == x.dtype and y.shape == x.shape
            assert torch.equal(y.cpu(), x.cpu()), f"nixl VRAM: {x.dtype}{tuple(x.shape)} changed"
            if x.is_cuda and x.nbytes > 4 << 10:  # streamed, not inline: stays on the GPU
                assert y.is_cuda, f"{x.dtype}{tuple(x.shape)} came back in host memory"
