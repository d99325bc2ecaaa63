"""Where a 4 KB activation round trip spends its time: cProfile of both ranks of a ping-pong.

Two processes (rank 0 sends ACTIVATION_TRANSFER, rank 1 echoes it as ACTIVATION_RESULT), 500
round trips timed (median printed), then 500 more under cProfile; each rank prints its 12
functions with the most time of their own. With `cuda`, the tensor lives on the GPU on both
sides: host transports stage it through host memory and the receiver moves it back to the GPU,
both through page-locked buffers as the runtime does (`afdserve.transport.staging`);
`cuda-pageable` makes the same copies with plain `Tensor.cpu()` / `Tensor.to("cuda")`, for
comparison.

    python benchmarks/profile_rtt.py                 # shm, cpu then cuda (cuda where there is one)
    python benchmarks/profile_rtt.py RANK PORT TRANSPORT DEVICE   # one rank (what the above runs)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import time

import torch


def spawn_pairs() -> None:
    devices = ["cpu"] + (["cuda", "cuda-pageable"] if torch.cuda.is_available() else [])
    for dev in devices:
        port = str(20000 + os.getpid() % 20000)
        peer = subprocess.Popen([sys.executable, __file__, "1", port, "shm", dev],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        subprocess.run([sys.executable, __file__, "0", port, "shm", dev], check=True)
        print(peer.communicate(timeout=120)[0], flush=True)


def main(rank: int, port: str, name: str, dev: str) -> None:
    from afdserve.transport.message import Message, MsgType
    from afdserve.transport.registry import create_transport
    from afdserve.transport.staging import to_device

    mode, dev = dev, dev.removesuffix("-pageable")
    if mode == "cuda-pageable":  # what a plain Tensor.to does: through pageable host memory
        outbound, inbound = (lambda t: t.cpu()), (lambda t: t.to(dev))
    else:  # the runtime's staging (the transport stages what it sends)
        outbound, inbound = (lambda t: t), (lambda t: to_device(t, torch.device(dev)))
    torch.set_num_threads(1)
    opts = {"device": "cuda"} if (name == "nixl" and dev == "cuda") else {}
    tr = create_transport(
        name, rank, 2, rendezvous=f"127.0.0.1:{port}", connect_timeout_s=60, **opts
    )
    peer = 1 - rank
    x = torch.ones(1024, device=dev)  # 4 KB
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def loop(n: int, start: int) -> float:
        ts = []
        for i in range(n):
            step = start + i
            t0 = time.perf_counter()
            if rank == 0:
                tr.send(
                    peer, Message(MsgType.ACTIVATION_TRANSFER, step, sender=0, tensor=outbound(x))
                )
                inbound(tr.recv(peer, MsgType.ACTIVATION_RESULT, step, timeout_s=30).tensor)
                sync()
            else:
                m = tr.recv(peer, MsgType.ACTIVATION_TRANSFER, step, timeout_s=30)
                y = inbound(m.tensor)
                tr.send(
                    peer, Message(MsgType.ACTIVATION_RESULT, step, sender=1, tensor=outbound(y))
                )
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    print(rank, name, mode, f"4K rtt {loop(500, 1):.1f} us", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    r = loop(500, 1000)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(12)
    print(f"--- rank {rank} {name} {mode} (profiled rtt {r:.1f} us)\n" + out.getvalue()[-2400:])
    time.sleep(0.3)
    tr.close()


if __name__ == "__main__":
    if len(sys.argv) == 1:
        spawn_pairs()
    else:
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
