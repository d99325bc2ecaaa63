"""Host <-> GPU staging of activations through page-locked buffers (afdserve.transport.staging)."""

from __future__ import annotations

import pytest
import torch

from afdserve.transport.staging import to_device, to_host

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_host_tensors_stay_where_they_are() -> None:
    t = torch.randn(3, 5)
    assert to_host(t) is t
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (4, 8), (300, 1024), (3, 5, 7)])
def test_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    host = (torch.randn(shape) * 100).to(dtype)
    gpu = to_device(host, torch.device("cuda"))
    assert gpu.device.type == "cuda" and gpu.dtype == dtype and gpu.shape == host.shape
    back = to_host(gpu)
    assert back.device.type == "cpu" and back.is_pinned()
    assert torch.equal(back, host)
    assert to_device(gpu, gpu.device) is gpu


@pytest.mark.gpu
@CUDA
def test_noncontiguous_views_move_whole() -> None:
    host = torch.randn(64, 48)
    assert torch.equal(to_host(to_device(host.t(), torch.device("cuda"))), host.t())
    gpu = torch.randn(64, 48, device="cuda")
    assert torch.equal(to_host(gpu[:, ::3]), gpu[:, ::3].cpu())


@pytest.mark.gpu
@CUDA
def test_buffers_are_not_reused_while_a_copy_still_reads_them() -> None:
    """Queue many small host-to-GPU copies behind a long GPU kernel: each returns before its
    copy has run, and its page-locked buffer is freed at once. Were a buffer handed out again
    (and overwritten) before its copy ran, an earlier tensor would arrive with later bytes."""
    dev = torch.device("cuda")
    big = torch.randn(4096, 4096, device=dev)
    g = torch.Generator().manual_seed(0)
    hosts = [torch.randn(256, 64, generator=g) for _ in range(200)]
    for _ in range(8):
        big = big @ big / 64  # [4096, 4096]: milliseconds of GPU work ahead of the copies
    gpus = [to_device(h, dev) for h in hosts]
    torch.cuda.synchronize()
    for h, x in zip(hosts, gpus, strict=True):
        assert torch.equal(x.cpu(), h)
