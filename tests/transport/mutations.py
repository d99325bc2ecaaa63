"""One hypothesis-driven way to damage an encoded frame, for the codec's robustness tests."""

from __future__ import annotations

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
