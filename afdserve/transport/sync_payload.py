"""The SYNC payload: how a `SyncInfo` is laid out in a frame (docs/protocol.md, "SYNC payload").

    u32 num_microbatches m, u32 has_request_ids (0 or 1),
    m x u32 tokens per microbatch,
    if has_request_ids: m x u32 ids per microbatch, then every id as i64, microbatch by microbatch.

Its own module: a sub-format of the frame's payload, with its own limits and checks.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from afdserve.errors import ProtocolError
from afdserve.transport.message import SyncInfo
from afdserve.transport.wire_types import INT64_MAX, INT64_MIN, UINT32_MAX, check_int

if TYPE_CHECKING:
    Buffer = bytes | bytearray | memoryview

MAX_MICROBATCHES = 1 << 16
MAX_SYNC_IDS = 1 << 24
_SYNC_HEAD = struct.Struct("<II")  # num_microbatches, has_request_ids


def encode_sync(sync: SyncInfo) -> bytes:
    if not isinstance(sync, SyncInfo):
        raise ProtocolError(f"sync must be a SyncInfo, got {type(sync).__name__}")
    tokens = tuple(sync.tokens_per_microbatch)
    ids = tuple(tuple(x) for x in sync.request_ids)
    m = len(tokens)
    if m > MAX_MICROBATCHES:
        raise ProtocolError(
            f"SyncInfo has {m} microbatches; the wire carries at most {MAX_MICROBATCHES}"
        )
    for n in tokens:
        check_int("tokens_per_microbatch entry", n, 0, UINT32_MAX)
    if ids and len(ids) != m:
        raise ProtocolError(
            f"SyncInfo.request_ids has {len(ids)} lists for {m} microbatches (must match, or be empty)"
        )
    flat = [i for group in ids for i in group]
    if len(flat) > MAX_SYNC_IDS:
        raise ProtocolError(
            f"SyncInfo carries {len(flat)} request ids; the wire carries at most {MAX_SYNC_IDS}"
        )
    for i in flat:
        check_int("request id", i, INT64_MIN, INT64_MAX)
    out = _SYNC_HEAD.pack(m, 1 if ids else 0) + struct.pack(f"<{m}I", *tokens)
    if ids:
        out += struct.pack(f"<{m}I", *(len(g) for g in ids)) + struct.pack(f"<{len(flat)}q", *flat)
    return out


def decode_sync(buf: Buffer) -> SyncInfo:
    mv = memoryview(buf)
    if len(mv) < _SYNC_HEAD.size:
        raise ProtocolError(
            f"SYNC payload of {len(mv)} bytes is shorter than its {_SYNC_HEAD.size}-byte head"
        )
    m, has_ids = _SYNC_HEAD.unpack_from(mv, 0)
    if m > MAX_MICROBATCHES:
        raise ProtocolError(f"SYNC payload claims {m} microbatches (at most {MAX_MICROBATCHES})")
    if has_ids not in (0, 1):
        raise ProtocolError(f"SYNC has_request_ids is {has_ids}, must be 0 or 1")
    pos = _SYNC_HEAD.size
    need = pos + 4 * m * (1 + has_ids)
    if len(mv) < need:
        raise ProtocolError(f"SYNC payload of {len(mv)} bytes is too short for {m} microbatches")
    tokens = struct.unpack_from(f"<{m}I", mv, pos)
    pos += 4 * m
    ids: tuple[tuple[int, ...], ...] = ()
    if has_ids:
        counts = struct.unpack_from(f"<{m}I", mv, pos)
        pos += 4 * m
        total = sum(counts)
        if total > MAX_SYNC_IDS or len(mv) != pos + 8 * total:
            raise ProtocolError(
                f"SYNC payload is {len(mv)} bytes but its request id counts need {pos + 8 * total}"
            )
        flat = struct.unpack_from(f"<{total}q", mv, pos)
        groups, i = [], 0
        for c in counts:
            groups.append(tuple(flat[i : i + c]))
            i += c
        ids = tuple(groups)
    elif len(mv) != pos:
        raise ProtocolError(f"SYNC payload is {len(mv)} bytes, expected {pos}")
    return SyncInfo(tuple(tokens), ids)
