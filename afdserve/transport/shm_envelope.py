"""The datagrams shm endpoints exchange: an envelope kind byte, then a kind-specific body.

Shared by the sending (`shm_send`) and receiving (`shm_receive`) halves of the shm transport and
its connection setup (`shm`); what each kind does is described in `shm`'s module docstring.
"""

from __future__ import annotations

import struct

FRAME = 1  # + a whole codec frame
STREAM = 2  # + SPAN of the first chunk + the frame prefix
CHUNK = 3  # + SPAN: more of the frame being streamed
FREE = 4  # + SPAN pairs: ring stretches the receiver is done with (lazily)
HELLO = 5  # + HELLO_HEAD (rank, ring bytes) + UTF-8 path of the ring the sender created for us
ATTACHED = 6  # + RANK: "I mapped your ring; unlink it"
BYE = 7  # + RANK: the endpoint is closing
PING = 8  # nothing: a liveness probe (the kernel refuses it if the peer's socket is gone)
PLACED = 9  # + SPAN of the whole tensor + the frame prefix
NEED = 10  # nothing: the sender waits for ring space (send the pending FREEs now)

SPAN = struct.Struct("<QQ")
"""A stretch of the ring: offset, bytes."""
HELLO_HEAD = struct.Struct("<IQ")
RANK = struct.Struct("<I")
KIND = [bytes([k]) for k in range(11)]
"""The kind byte of each envelope, ready to send."""
DELIVERS = (FRAME, CHUNK, STREAM, PLACED)
"""The envelopes that can complete a message."""
MAX_DGRAM = 1 << 20
