"""The tcp transport's connection handshake: which rank a connection speaks for, and, with the
group's key, the proof of it.

Why it exists: a tcp endpoint's receiving socket (a ZeroMQ ROUTER) takes connections from
anyone who reaches its port, and a frame's `sender` field says whatever its sender wrote. One
spoofed SYNC_REQUEST wedged an FFN worker for a minute. So every connection opens with this
handshake, and the receiver binds the connection to the rank it established: a frame on that
connection that claims another sender is dropped, and so is every frame on a connection that
has not finished the handshake.

A connection is known by its ZeroMQ routing id, 16 random bytes the connecting endpoint draws
(`new_routing_id`) and sends in the ZeroMQ handshake of every TCP connection it makes, so a
binding survives ZeroMQ's automatic reconnects. With a key (`TransportOptions.auth_key`, the
per-group secret the front sends every worker in `Configure`) both ends prove they hold it,
HMAC-SHA256 over both ranks, both nonces and the routing id, with distinct labels per direction:

    C -> S  HELLO      mode, client rank, server rank, nonce_c
    S -> C  CHALLENGE  nonce_c, nonce_s, HMAC(key, "server" | ranks | nonce_c | nonce_s | id)
    C -> S  AUTH       nonce_c, HMAC(key, "client" | ranks | nonce_s | nonce_c | id)
    S -> C  WELCOME    nonce_c                       (or REFUSED nonce_c reason, at any step)

The client checks the server's MAC before it sends anything else, so it never streams hidden
states to an endpoint without the key (say, one a forged rendezvous address points at). Without
a key (transports built directly, as tests do) HELLO is answered with WELCOME at once: the
connection is bound to the rank it claims, unproven, and the first connection to claim a rank
keeps it. What this protects against and what it does not: docs/protocol.md, "tcp".

Only the handshake is authenticated, not each frame: an HMAC over every frame was measured at
0.6-0.8 GB/s here (6.4 ms for a 4 MiB activation, paid by sender and receiver), several times
the cost of moving the frame; CurveZMQ's per-message encryption was 7-20x slower than plain
ZeroMQ. Here: the messages and both ends' state, no sockets (`tcp` moves the bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from typing import NamedTuple

from afdserve.errors import ProtocolError

MAGIC = b"AFDH"
"""Handshake messages start with this; frames with b"AFDW" (protocol.MAGIC)."""
VERSION = 1
HELLO, CHALLENGE, AUTH, WELCOME, REFUSED = 1, 2, 3, 4, 5
MODE_OPEN, MODE_HMAC = 0, 1
"""HELLO's mode: no key (bound to the claimed rank), or the key proven with HMAC-SHA256."""
NONCE_BYTES = 16
MAC_BYTES = 32
ROUTING_ID_BYTES = 16
MAX_REASON_BYTES = 200
MAX_PENDING = 64
"""Handshakes a server keeps half-done; the oldest is forgotten beyond this (a connection
flood costs a bounded amount of memory)."""

_HEAD = struct.Struct("<4sBB")  # magic, version, kind
_HELLO = struct.Struct(f"<4sBBBII{NONCE_BYTES}s")  # + mode, client rank, server rank, nonce_c
_CHALLENGE = struct.Struct(f"<4sBB{NONCE_BYTES}s{NONCE_BYTES}s{MAC_BYTES}s")
_AUTH = struct.Struct(f"<4sBB{NONCE_BYTES}s{MAC_BYTES}s")
_WELCOME = struct.Struct(f"<4sBB{NONCE_BYTES}s")  # REFUSED: + UTF-8 reason
_RANKS = struct.Struct("<II")
_SERVER_LABEL = b"afdserve tcp handshake v1: server"
_CLIENT_LABEL = b"afdserve tcp handshake v1: client"


def is_handshake(part: bytes | memoryview) -> bool:
    return bytes(part[:4]) == MAGIC


def new_routing_id() -> bytes:
    """16 random bytes, the first non-zero (ZeroMQ reserves ids that start with 0 for the ones
    it generates itself): unguessable, so nobody off the path can take over a connection's
    binding by reconnecting under its id."""
    return bytes([1 + os.urandom(1)[0] % 255]) + os.urandom(ROUTING_ID_BYTES - 1)


def _mac(
    key: bytes, label: bytes, me: int, other: int, n1: bytes, n2: bytes, ident: bytes
) -> bytes:
    return hmac.digest(key, label + _RANKS.pack(me, other) + n1 + n2 + ident, hashlib.sha256)


def _kind(msg: bytes) -> int:
    if len(msg) < _HEAD.size:
        raise ProtocolError(f"handshake message of {len(msg)} bytes is too short")
    magic, version, kind = _HEAD.unpack_from(msg)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a version {VERSION} handshake message")
    return kind


def _refused(nonce: bytes, reason: str) -> bytes:
    return _WELCOME.pack(MAGIC, VERSION, REFUSED, nonce) + reason.encode()[:MAX_REASON_BYTES]


class Answer(NamedTuple):
    """What a server does with one handshake message: send `reply` back on the connection; if
    `refused`, log it as a refused connection; if `bound` is a rank, the connection now speaks
    for it."""

    reply: bytes
    refused: str = ""
    bound: int | None = None


class ServerGate:
    """The receiving end: runs the handshake of every connection and remembers which rank each
    finished connection is bound to. Called by one thread at a time (the pump lock's)."""

    def __init__(self, rank: int, peers: tuple[int, ...], key: bytes) -> None:
        self.rank = rank
        self.peers = frozenset(peers)
        self.key = key
        self._bound: dict[bytes, int] = {}  # routing id -> rank
        self._id_of: dict[int, bytes] = {}  # rank -> its routing id (one connection per rank)
        self._pending: OrderedDict[bytes, tuple[int, bytes, bytes]] = OrderedDict()
        """routing id -> (client rank, nonce_c, nonce_s) of a challenge not yet answered"""

    def rank_of(self, ident: bytes) -> int | None:
        """The rank connection `ident` is bound to, or None (handshake not finished)."""
        return self._bound.get(ident)

    def handle(self, ident: bytes, msg: bytes) -> Answer:
        """The answer to handshake message `msg` from connection `ident`. ProtocolError for a
        message too mangled to answer (the connection gets no reply)."""
        kind = _kind(msg)
        if kind == HELLO:
            return self._hello(ident, msg)
        if kind == AUTH:
            return self._auth(ident, msg)
        raise ProtocolError(f"handshake message of kind {kind} sent to a receiving end")

    def _hello(self, ident: bytes, msg: bytes) -> Answer:
        if len(msg) != _HELLO.size:
            raise ProtocolError(f"HELLO of {len(msg)} bytes (expected {_HELLO.size})")
        _, _, _, mode, client, server, nonce_c = _HELLO.unpack(msg)
        if server != self.rank:
            return self._refuse(nonce_c, f"this is rank {self.rank}, not rank {server}")
        if client not in self.peers:
            return self._refuse(nonce_c, f"rank {client} is not a peer of rank {self.rank}")
        if mode != (MODE_HMAC if self.key else MODE_OPEN):
            have = "authenticates with the group's key" if self.key else "has no key"
            return self._refuse(nonce_c, f"mode {mode}: rank {self.rank} {have}")
        if not self.key:
            holder = self._id_of.get(client)
            if holder is not None and holder != ident:  # first come keeps an unproven claim
                return self._refuse(nonce_c, f"rank {client} is connected already")
            return self._bind(ident, client, nonce_c)
        nonce_s = os.urandom(NONCE_BYTES)
        self._pending.pop(ident, None)
        self._pending[ident] = (client, nonce_c, nonce_s)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        mac = _mac(self.key, _SERVER_LABEL, self.rank, client, nonce_c, nonce_s, ident)
        return Answer(_CHALLENGE.pack(MAGIC, VERSION, CHALLENGE, nonce_c, nonce_s, mac))

    def _auth(self, ident: bytes, msg: bytes) -> Answer:
        if len(msg) != _AUTH.size:
            raise ProtocolError(f"AUTH of {len(msg)} bytes (expected {_AUTH.size})")
        _, _, _, nonce_c, mac = _AUTH.unpack(msg)
        pending = self._pending.get(ident)
        if pending is None or pending[1] != nonce_c or not self.key:
            return self._refuse(nonce_c, "AUTH without a challenge to answer")
        client, _, nonce_s = self._pending.pop(ident)
        want = _mac(self.key, _CLIENT_LABEL, client, self.rank, nonce_s, nonce_c, ident)
        if not hmac.compare_digest(mac, want):
            return self._refuse(
                nonce_c, f"the connection claiming rank {client} failed to prove the key"
            )
        return self._bind(ident, client, nonce_c)

    def _bind(self, ident: bytes, client: int, nonce_c: bytes) -> Answer:
        old = self._id_of.get(client)
        if old is not None and old != ident:  # a proven reconnect replaces the earlier one
            del self._bound[old]
        self._bound[ident] = client
        self._id_of[client] = ident
        return Answer(_WELCOME.pack(MAGIC, VERSION, WELCOME, nonce_c), bound=client)

    def _refuse(self, nonce_c: bytes, reason: str) -> Answer:
        return Answer(_refused(nonce_c, reason), refused=reason)


class ClientHandshake:
    """The connecting end's state for one peer: `hello()` starts (or restarts) the handshake,
    `on_reply` takes each message the server sends back, until `done`."""

    def __init__(self, rank: int, server: int, key: bytes, ident: bytes) -> None:
        self.rank, self.server, self.key, self.ident = rank, server, key, ident
        self.done = False
        self._nonce = b""
        self._authed = False  # AUTH sent for the current nonce: WELCOME may follow

    def hello(self) -> bytes:
        """A HELLO with a fresh nonce: replies to an earlier one are ignored from now on."""
        self._nonce = os.urandom(NONCE_BYTES)
        self._authed = False
        mode = MODE_HMAC if self.key else MODE_OPEN
        return _HELLO.pack(MAGIC, VERSION, HELLO, mode, self.rank, self.server, self._nonce)

    def on_reply(self, msg: bytes) -> bytes | None:
        """The message to send next (AUTH), or None. ProtocolError if the server refused us or
        failed to prove the key: this connection must not carry frames."""
        kind = _kind(msg)
        size = {CHALLENGE: _CHALLENGE.size, WELCOME: _WELCOME.size}.get(kind, _WELCOME.size)
        if len(msg) < size or (kind != REFUSED and len(msg) != size):
            raise ProtocolError(f"rank {self.server} sent a handshake reply of {len(msg)} bytes")
        if msg[_HEAD.size : _HEAD.size + NONCE_BYTES] != self._nonce or self.done:
            return None  # the answer to an earlier HELLO (retried), or a late duplicate
        if kind == REFUSED:
            reason = msg[_WELCOME.size :].decode("utf-8", errors="replace")
            raise ProtocolError(
                f"rank {self.server} refused the connection of rank {self.rank}: {reason}"
            )
        if kind == WELCOME:
            if self.key and not self._authed:  # with a key, only our AUTH earns a WELCOME
                raise ProtocolError(f"rank {self.server} welcomed rank {self.rank} unchallenged")
            self.done = True
            return None
        if kind != CHALLENGE:
            raise ProtocolError(f"rank {self.server} sent handshake message kind {kind}")
        if not self.key:
            raise ProtocolError(f"rank {self.server} challenged rank {self.rank}, which has no key")
        _, _, _, _, nonce_s, mac = _CHALLENGE.unpack(msg)
        want = _mac(
            self.key, _SERVER_LABEL, self.server, self.rank, self._nonce, nonce_s, self.ident
        )
        if not hmac.compare_digest(mac, want):
            raise ProtocolError(
                f"the endpoint at rank {self.server}'s address failed to prove the group's key"
            )
        self._authed = True
        mac_c = _mac(
            self.key, _CLIENT_LABEL, self.rank, self.server, nonce_s, self._nonce, self.ident
        )
        return _AUTH.pack(MAGIC, VERSION, AUTH, self._nonce, mac_c)
