"""A peer process for the transport tests: `python peer_main.py '<json config>'`.

It plays an attention worker against the test process (the FFN rank): connect, optionally send
garbage through its own endpoint's raw channel, answer one SYNC_REQUEST with a SYNC_ACK, then
echo every ACTIVATION_TRANSFER of step k = 1, 2, ... back as an ACTIVATION_RESULT with the same
key, tensor and text, until a frame whose text is "stop". Exit code 0 means every wait was met.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from afdserve.transport.codec import encode
from afdserve.transport.message import Message, MsgType
from afdserve.transport.registry import create_transport


def key_of(k: int) -> tuple[int, int]:
    """(layer, microbatch) of echo step k: varied so all three key fields matter."""
    return k % 3, k % 2


def send_garbage(tr, backend: str, dst: int) -> int:
    """Malformed frames sent through this endpoint's own channel to dst; returns how many."""
    junk = [b"", b"\x01", b"\x01" + os.urandom(300), os.urandom(64)]
    valid = bytearray(encode(Message(MsgType.HEARTBEAT, 9, sender=tr.rank, text="ok")))
    valid[5] = 99  # unknown message type
    if backend == "shm":
        for j in junk + [
            b"\x01" + bytes(valid),
            b"\x03" + os.urandom(16),
            b"\x02" + os.urandom(200),
        ]:
            tr._sock.sendto(j, tr._addr[dst])
        return len(junk) + 3
    if backend == "tcp":  # on this endpoint's own (authenticated) connection
        other = (tr.rank + 1) % dst if dst > 1 else tr.rank + 7  # another attention rank
        spoofed = encode(Message(MsgType.HEARTBEAT, 1, sender=other))
        frames = [[j] for j in junk if j] + [[bytes(valid)], [b"a", b"b", b"c"], [spoofed]]
        for f in frames:
            tr._dealers[dst].send_multipart(f)
        return len(frames)
    if backend == "nixl":
        for j in junk + [b"\x01" + bytes(valid)]:
            if j:
                tr._notify(dst, j)
        return len([j for j in junk if j]) + 1
    return 0


def main() -> int:
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format=f"peer {cfg['rank']}: %(message)s")
    if cfg["options"].get("device") == "cuda":
        torch.cuda.set_device(0)
    options = dict(cfg["options"])
    if "auth_key_hex" in options:
        options["auth_key"] = bytes.fromhex(options.pop("auth_key_hex"))
    tr = create_transport(cfg["backend"], cfg["rank"], cfg["world"], **options)
    ffn = cfg["ffn"]
    timeout = cfg.get("timeout_s", 30.0)
    try:
        if cfg.get("garbage"):
            print(f"garbage {send_garbage(tr, cfg['backend'], ffn)}", flush=True)
        sync = tr.recv(ffn, MsgType.SYNC_REQUEST, 0, timeout_s=timeout)
        tr.send(ffn, Message(MsgType.SYNC_ACK, 0, sender=tr.rank, sync=sync.sync, text=sync.text))
        k = 1
        while True:
            layer, mb = key_of(k)
            m = tr.recv(ffn, MsgType.ACTIVATION_TRANSFER, k, layer, mb, timeout_s=timeout)
            if m.text == "stop":
                break
            tr.send(
                ffn,
                Message(
                    MsgType.ACTIVATION_RESULT, k, layer, mb, tr.rank, tensor=m.tensor, text=m.text
                ),
            )
            k += 1
        print(f"echoed {k - 1}", flush=True)
    finally:
        tr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
