"""Picking a backend by name, and option validation with clear errors (no processes needed)."""

from __future__ import annotations

import socket

import pytest

from afdserve.errors import TransportTimeout, UserInputError
from afdserve.transport import nixl as nixl_mod
from afdserve.transport.options import TransportOptions, afd_peers, parse_host_port
from afdserve.transport.registry import create_transport, option_names, transport_names
from afdserve.transport.shm import ShmOptions, ShmTransport, socket_name
from afdserve.transport.shm_segments import sweep_stale_segments

from .conftest import free_port, shm_segments


def test_names_and_options():
    assert transport_names() == ("shm", "tcp", "torch", "nixl")
    assert {"rendezvous", "peers", "connect_timeout_s", "send_timeout_s", "ring_bytes"} <= set(
        option_names("shm")
    )
    assert "bind_host" in option_names("tcp")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("carrier-pigeon", {}, "unknown transport 'carrier-pigeon'"),
        (
            "shm",
            {"session": "s", "ring_byte": 5},
            r"unknown shm transport option\(s\) \['ring_byte'\]",
        ),
        ("shm", {}, "needs `session`"),
        ("shm", {"session": "a/b"}, "shm session must be"),
        ("shm", {"session": "s", "ring_bytes": 100}, "at least 4096"),
        ("shm", {"session": "s", "inline_bytes": 10**6}, "inline_bytes must be at most"),
        ("tcp", {}, "needs `rendezvous`"),
        ("tcp", {"rendezvous": "127.0.0.1"}, "HOST:PORT"),
        ("tcp", {"rendezvous": "h:99999"}, "port must be in"),
        ("tcp", {"rendezvous": "h:1", "bind_host": "0.0.0.0"}, "advertise_host"),
        ("torch", {"rendezvous": "h:1", "backend": "nccl"}, "only 'gloo'"),
        ("nixl", {"rendezvous": "h:1", "device": "tpu"}, "'cpu' or 'cuda'"),
        ("shm", {"session": "s", "connect_timeout_s": 0}, "connect_timeout_s must be a positive"),
        ("shm", {"session": "s", "peers": [1, 1]}, "must not repeat"),
        ("tcp", {"rendezvous": "h:1", "spin_s": -1}, "spin_s must be"),
        ("shm", {"session": "s", "max_frame_bytes": 4096}, "max_frame_bytes must be"),
        ("tcp", {"rendezvous": "h:1", "max_frame_bytes": 2**41}, "max_frame_bytes must be"),
        ("tcp", {"rendezvous": "h:1", "max_frame_bytes": 1.5e9}, "max_frame_bytes must be"),
        ("tcp", {"rendezvous": "h:1", "auth_key": b"short"}, "auth_key must be bytes"),
        ("tcp", {"rendezvous": "h:1", "auth_key": "a str key of 20+"}, "auth_key must be bytes"),
    ],
)
def test_bad_options_are_user_errors(name, kwargs, match):
    with pytest.raises(UserInputError, match=match):
        create_transport(name, 0, 2, **kwargs)


def test_peer_and_rank_validation():
    opts = TransportOptions(peers=(2,))
    assert opts.peer_ranks(0, 3) == (2,)
    assert TransportOptions().peer_ranks(1, 3) == (0, 2)
    with pytest.raises(UserInputError, match="rank must be in 0..2"):
        TransportOptions().peer_ranks(3, 3)
    with pytest.raises(UserInputError, match="not another rank"):
        TransportOptions(peers=(0,)).peer_ranks(0, 3)
    with pytest.raises(UserInputError, match="world_size"):
        TransportOptions().peer_ranks(0, 1)
    assert afd_peers(0, 3) == (3,) and afd_peers(3, 3) == (0, 1, 2) and afd_peers(1, 2, 2) == (2, 3)
    assert parse_host_port("[::1]:80") == ("::1", 80)


def test_nixl_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(nixl_mod, "_NIXL_MODULES", ("no_such_nixl_module",))
    assert not nixl_mod.nixl_available()
    with pytest.raises(UserInputError, match="pip install --no-deps nixl-cu12"):
        create_transport("nixl", 0, 2, rendezvous=f"127.0.0.1:{free_port()}")


def test_shm_connect_timeout_cleans_up():
    """A peer that never comes: TransportTimeout at the deadline, and no ring file left."""
    before = shm_segments()
    with pytest.raises(TransportTimeout, match=r"peers \[1\] did not connect"):
        ShmTransport(0, 2, ShmOptions(session=f"lonely{free_port()}", connect_timeout_s=0.3))
    assert shm_segments() <= before


def test_shm_session_rank_in_use_is_refused():
    session = f"dup{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(socket_name(session, 0))
        with pytest.raises(UserInputError, match="already has a live rank 0"):
            ShmTransport(0, 2, ShmOptions(session=session, connect_timeout_s=0.3))


def test_sweep_removes_segments_of_dead_creators(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"afdserve-s-0to1-{dead_pid}"
    live = tmp_path / "afdserve-s-0to1-1"  # pid 1 always exists
    other = tmp_path / "something-else"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert sweep_stale_segments(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_the_auth_key_is_never_printed():
    from afdserve.transport.tcp import TcpOptions

    opts = TcpOptions(rendezvous="h:1", auth_key=b"s3cret-s3cret-s3cret")
    assert "s3cret" not in repr(opts) and "auth_key" not in repr(opts)


def test_a_sender_refuses_a_frame_its_receivers_would_drop():
    from afdserve.errors import ProtocolError
    from afdserve.transport.options import TransportOptions

    opts = TransportOptions(max_frame_bytes=1 << 16)
    opts.check_frame_len(1 << 16, 3)
    with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
        opts.check_frame_len((1 << 16) + 1, 3)
