"""Moving activations between a GPU and host memory through page-locked (pinned) buffers.

Host transports (shm, tcp, torch/gloo) carry bytes in host memory, so a GPU worker copies every
activation it sends to the host and every one it receives back to the GPU. A plain `Tensor.to`
does that through *pageable* memory: CUDA then bounces it through a driver buffer and the copy
is synchronous with the stream. Through page-locked memory the copy engine reads or writes the
bytes directly.

The page-locked buffers come from torch's caching host allocator (`pin_memory=True`): they are
reused from call to call, and a buffer that a non-blocking host-to-device copy still reads is
not handed out again until that copy has finished (the allocator records an event on the
copy's stream), so a caller never waits here for the GPU to catch up.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` (itself when it is there already).

    Host to GPU: one host copy into a page-locked buffer, then a non-blocking copy to the GPU,
    ordered on the current stream before whatever the caller launches next.
    """
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # same shape, page-locked
        pinned.copy_(t)
        return pinned.to(device, non_blocking=True)
    return t.to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory (itself when it is there already).

    GPU to host: straight into a page-locked buffer. The copy is synchronous, so the bytes are
    there when this returns, and the tensor returned owns its buffer (a transport that keeps a
    reference to it while sending stays safe).
    """
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned
    return t.cpu()
