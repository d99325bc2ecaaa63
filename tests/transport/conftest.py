"""Fixtures for multi-process transport tests: free ports, peer processes, /dev/shm checks.

The test process is the FFN rank r of a group of r attention peers (subprocesses running
peer_main.py); every process binds 127.0.0.1 and every subprocess is killed and reaped on exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from afdserve.transport.options import free_port

PEER_MAIN = Path(__file__).with_name("peer_main.py")
BACKENDS = ("shm", "tcp", "torch", "nixl")


def shm_segments() -> set[str]:
    """This project's ring files in /dev/shm (other tools' files are not ours to judge)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("afdserve-")}
    except FileNotFoundError:
        return set()


def backend_options(backend: str, rendezvous: str) -> dict:
    """Small buffers, so modest tensors already stream through rings/slots many times over."""
    common = {"rendezvous": rendezvous, "connect_timeout_s": 60.0, "send_timeout_s": 10.0}
    if backend == "shm":
        return common | {"ring_bytes": 256 << 10, "chunk_bytes": 64 << 10, "inline_bytes": 8 << 10}
    if backend == "nixl":
        return common | {"slot_bytes": 64 << 10, "num_slots": 2, "inline_bytes": 4 << 10}
    return common


def skip_unless_available(backend: str) -> None:
    if backend == "nixl":
        from afdserve.transport.nixl import nixl_available

        if not nixl_available():
            pytest.skip(
                "nixl is not installed (pip install --no-deps nixl-cu12): nixl transport tests skipped"
            )


@dataclass
class Group:
    """r peer processes (attention ranks 0..r-1) and the test process's endpoint (FFN rank r)."""

    backend: str
    r: int
    options: dict
    procs: list[subprocess.Popen] = field(default_factory=list)
    transport: object = None

    @property
    def ffn(self) -> int:
        return self.r

    def start(self, *, garbage: bool = False, peer_timeout_s: float = 30.0) -> None:
        from afdserve.transport.registry import create_transport

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        peer_options = {k: v for k, v in self.options.items() if k != "auth_key"}
        if self.options.get("auth_key"):  # JSON has no bytes: peer_main decodes the hex
            peer_options["auth_key_hex"] = self.options["auth_key"].hex()
        for rank in range(self.r):
            cfg = {
                "backend": self.backend, "rank": rank, "world": self.r + 1, "ffn": self.r,
                "options": peer_options | {"peers": [self.r]}, "garbage": garbage, "timeout_s": peer_timeout_s,
            }  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(PEER_MAIN), json.dumps(cfg)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )  # fmt: skip
            )
        self.transport = create_transport(
            self.backend, self.r, self.r + 1, **(self.options | {"peers": list(range(self.r))})
        )

    def wait_peers(self, timeout_s: float = 60.0) -> list[tuple[int, str, str]]:
        out = []
        for p in self.procs:
            try:
                stdout, stderr = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            out.append((p.returncode, stdout, stderr))
        return out

    def cleanup(self) -> None:
        if self.transport is not None:
            self.transport.close()
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.fixture
def make_group() -> Iterator:
    groups: list[Group] = []

    def make(backend: str, r: int) -> Group:
        skip_unless_available(backend)
        g = Group(backend, r, backend_options(backend, f"127.0.0.1:{free_port()}"))
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.cleanup()
