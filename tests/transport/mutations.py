"""Ways to damage an encoded frame, for the codec's and the transports' robustness tests: one
hypothesis-driven (`mutate_frame`), one seeded and fast enough for 100,000 frames (`mutate`)."""

from __future__ import annotations

import random
import struct

from hypothesis import strategies as st

HEADER_FIELD_OFFSETS = [0, 4, 5, 6, 7, 8, 12, 16, 24, 28, 32, 36, 40, 48, 56, 104]
"""Where the fixed header's fields start (magic, version, type, ..., shape)."""


def mutate_frame(frame: bytearray, data: st.DataObject, ops: list[str]) -> str:
    """Apply one of `ops` to `frame` in place and return its name: `none`, `flip` (1-4 random
    bits), `set` (plant arbitrary bytes over a header field), `truncate`, `extend` (append
    bytes) or `splice` (insert bytes anywhere)."""
    op = data.draw(st.sampled_from(ops))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "set":
        off = data.draw(st.sampled_from(HEADER_FIELD_OFFSETS))
        width = data.draw(st.sampled_from([1, 4, 8]))
        frame[off : off + width] = data.draw(st.binary(min_size=width, max_size=width))
    elif op == "truncate":
        del frame[data.draw(st.integers(0, len(frame) - 1)) :]
    elif op == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=16))
    elif op == "splice":
        i = data.draw(st.integers(0, len(frame)))
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif op != "none":
        raise ValueError(f"unknown mutation {op!r}")
    return op


BIG = [0, 1, 2, 3, 7, 8, 255, 2**16, 2**20, 2**21, 2**31 - 1, 2**32 - 1, 2**39, 2**40,
       2**40 + 1, 2**63 - 1, 2**64 - 1]  # fmt: skip
FIELDS = [(4, 1), (5, 1), (6, 1), (7, 1), (8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (32, 4),
          (36, 4), (40, 8)] + [(48 + 8 * i, 8) for i in range(8)]  # fmt: skip
"""(offset, width) of every header field after the magic."""


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One seeded damage: bit flips, a header field set to an edge value, a truncation, an
    extension, bytes spliced in, or the shape attack (a 0 dimension beside huge ones, any dtype
    code, any payload length)."""
    f = bytearray(frame)
    op = rng.randrange(7)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(f))
            f[i] ^= 1 << rng.randrange(8)
    elif op in (1, 2):
        for _ in range(op):
            off, width = rng.choice(FIELDS)
            value = rng.choice(BIG) if rng.random() < 0.7 else rng.getrandbits(8 * width)
            f[off : off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    elif op == 3:
        del f[rng.randrange(len(f)) :]
    elif op == 4:
        f += rng.randbytes(rng.randint(1, 64))
    elif op == 5:
        i = rng.randrange(len(f) + 1)
        f[i:i] = rng.randbytes(rng.randint(1, 16))
    else:
        ndim = rng.randint(1, 8)
        dims = [
            rng.choice([2**20, 2**30, 2**39, 2**40, rng.randint(1, 2**40)]) for _ in range(ndim)
        ]
        dims[rng.randrange(ndim)] = 0
        f[7] = ndim
        f[6] = rng.randrange(13)
        struct.pack_into("<8Q", f, 48, *dims, *([0] * (8 - ndim)))
        struct.pack_into("<Q", f, 40, rng.choice([0, 0, 8, 2**40]))
    return bytes(f)
