"""Pick a multi-process transport by name and build one endpoint of a group.

A launcher gives every worker process the same `name` and group-wide options and its own
`rank` (attention worker k -> k, FFN worker j -> r + j); each process calls
`create_transport` once. The call returns when the endpoint is connected to its peers, or
raises TransportTimeout at `connect_timeout_s`. Backends are imported only when asked for, so a
missing optional dependency (nixl) only matters to whoever picks that backend.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from afdserve.errors import UserInputError
from afdserve.transport.base import Transport

# name -> (module, transport class, options class)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "shm": ("afdserve.transport.shm", "ShmTransport", "ShmOptions"),
    "tcp": ("afdserve.transport.tcp", "TcpTransport", "TcpOptions"),
    "torch": ("afdserve.transport.torch_dist", "TorchDistTransport", "TorchDistOptions"),
    "nixl": ("afdserve.transport.nixl", "NixlTransport", "NixlOptions"),
}


def transport_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def options_class(name: str) -> type:
    module, _, opts = _lookup(name)
    return getattr(importlib.import_module(module), opts)


def create_transport(name: str, rank: int, world_size: int, **options: Any) -> Transport:
    """Build rank `rank`'s endpoint of backend `name` ("shm", "tcp", "torch", "nixl").

    Options common to all (see options.TransportOptions): rendezvous="HOST:PORT" (rank 0 hosts
    a TCPStore there; shm only derives its session name from it), peers=(...) (default: every
    other rank), connect_timeout_s, send_timeout_s. Backend options are listed by
    `option_names(name)`; an unknown one is a UserInputError naming the valid ones.
    """
    module, cls, opts_cls = _lookup(name)
    mod = importlib.import_module(module)
    options_type = getattr(mod, opts_cls)
    valid = {f.name for f in dataclasses.fields(options_type)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise UserInputError(
            f"unknown {name} transport option(s) {unknown}; valid: {sorted(valid)}"
        )
    return getattr(mod, cls)(rank, world_size, options_type(**options))


def option_names(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(options_class(name)))


def _lookup(name: str) -> tuple[str, str, str]:
    if name not in BACKENDS:
        raise UserInputError(
            f"unknown transport {name!r}; choose one of {', '.join(BACKENDS)} (or 'local' in-process)"
        )
    return BACKENDS[name]
