"""Transfer timings: the one-way time of a hidden-state message over the in-process `local`
transport, a plain tensor copy (`copy`) and the multi-process backends of
`afdserve.transport.registry` (two endpoints in this process), each fitted as a line in tokens.

Optional measurements: a transport that cannot be timed here is reported as skipped, with why.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np

from afdserve.calibration.grid import ProfileGrid
from afdserve.calibration.timing import Timer
from afdserve.sim.fit import fit_affine

TRANSPORT_DEADLINE_S = 20.0


def time_transport(name: str, m, timer: Timer, grid: ProfileGrid, device: str) -> dict[str, Any]:
    """`name`'s transfer fit (one way, per token) and its points, or {"skipped": why}."""
    try:
        if name == "copy":
            pts = _copy_points(m, timer, grid, device)
        elif name == "local":
            from afdserve.transport.local import LocalHub

            hub = LocalHub(2)
            try:
                pts = _ping_pong(hub.endpoints[0], hub.endpoints[1], m, timer, grid, device)
            finally:
                hub.close()
        else:
            pts = _registry_points(name, m, timer, grid, device)
    except Exception as exc:  # optional measurements: report why, never fail the profile
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    arr = np.asarray(pts, dtype=np.float64)
    fit = fit_affine(arr[:, 0], arr[:, 1])
    return {**fit.to_dict(), "points": [list(p) for p in pts]}


def _copy_points(m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    import torch

    out = []
    for n in grid.transport_tokens:
        src = torch.randn(n, m.config.hidden_size, dtype=m.dtype, device=device)  # [n, D]
        dst = torch.empty_like(src)
        out.append((n, timer.best_ms(lambda src=src, dst=dst: dst.copy_(src))))
    return out


def _ping_pong(a, b, m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """One-way time of a hidden-state message: a -> b -> a round trips, halved. Endpoint b
    echoes from its own thread (as the FFN worker does); every wait has a deadline."""
    import torch

    from afdserve.transport.message import Message, MsgType

    per_size = timer.warmup + timer.repeats
    total = per_size * len(grid.transport_tokens)
    errors: list[BaseException] = []

    def echo() -> None:
        try:
            for i in range(total):
                msg = b.recv(a.rank, MsgType.ACTIVATION_TRANSFER, i, timeout_s=TRANSPORT_DEADLINE_S)
                reply = Message(MsgType.ACTIVATION_RESULT, i, sender=b.rank, tensor=msg.tensor)
                b.send(a.rank, reply)
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    th = threading.Thread(target=echo, daemon=True, name="profile-echo")
    th.start()
    out = []
    step = 0
    for n in grid.transport_tokens:
        h = torch.randn(n, m.config.hidden_size, dtype=m.dtype, device="cpu")  # [n, D]
        times = []
        for k in range(per_size):
            t0 = time.perf_counter()
            a.send(b.rank, Message(MsgType.ACTIVATION_TRANSFER, step, sender=a.rank, tensor=h))
            a.recv(b.rank, MsgType.ACTIVATION_RESULT, step, timeout_s=TRANSPORT_DEADLINE_S)
            if k >= timer.warmup:
                times.append((time.perf_counter() - t0) / 2)
            step += 1
        out.append((n, min(times) * 1e3))
    th.join(timeout=TRANSPORT_DEADLINE_S)
    if errors:
        raise errors[0]
    return out


def _registry_points(name: str, m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """Two endpoints of a multi-process backend in this process (threads), then a ping-pong."""
    from afdserve.transport.options import free_port
    from afdserve.transport.registry import create_transport

    port = free_port()
    opts: dict[str, Any] = {"rendezvous": f"127.0.0.1:{port}", "connect_timeout_s": 10.0}
    if name == "shm":
        opts["session"] = f"afdprofile-{uuid.uuid4().hex[:12]}"
        opts["ring_bytes"] = 16 << 20
    eps: list[Any] = [None, None]
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        try:
            eps[rank] = create_transport(name, rank, 2, **opts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(k,), daemon=True) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=TRANSPORT_DEADLINE_S)
    try:
        if errors:
            raise errors[0]
        if any(e is None for e in eps):
            raise TimeoutError(f"{name} endpoints not connected within {TRANSPORT_DEADLINE_S} s")
        return _ping_pong(eps[0], eps[1], m, timer, grid, device)
    finally:
        for ep in eps:
            if ep is not None:
                ep.close()
