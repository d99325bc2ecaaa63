"""Transport round-trip latency and one-way bandwidth, beside memcpy and raw gloo send/recv.

    python benchmarks/bench_transport.py                       # every transport, 4 KiB .. 64 MiB
    python benchmarks/bench_transport.py --transports shm tcp --sizes 4K 1M 64M

Two processes per transport, pinned to two different cores (like `taskset -c`), one torch
thread each. Rank 0 drives, rank 1 serves:
- round trip: rank 0 sends an ACTIVATION_TRANSFER of N bytes, rank 1 answers with the tensor it
  got as ACTIVATION_RESULT; the median over repetitions is reported (so one round trip moves
  2N bytes). `hb` rows use a HEARTBEAT frame with no tensor: the smallest message.
- bandwidth: rank 0 sends K frames of N bytes back to back, rank 1 receives all of them and
  answers one HEARTBEAT; N*K over that time.
Baselines: `memcpy` is an in-process tensor copy of N bytes into a preallocated buffer (and
into a freshly allocated one, which is what a receiver that hands out a new tensor has to do);
`gloo` is torch.distributed gloo send/recv of a uint8 tensor between the same two cores.

`--device cuda` (a GPU host): every tensor sent and received lives on the GPU. The receiver moves
what a host transport delivers onto the GPU before counting it (through page-locked memory, as
the runtime does: `afdserve.transport.staging`), nixl registers VRAM slots (GPU to
GPU), `memcpy` is a device-to-device copy, and the gloo baseline is left out (CPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = ["4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"]
TRANSPORTS = ["shm", "tcp", "torch", "nixl"]


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def free_port() -> int:
    from afdserve.transport.options import free_port as pick

    return pick()


def pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def plan(n: int, budget_s: float) -> tuple[int, int]:
    """(round trips, bandwidth frames) for size n: enough to take ~budget_s on a slow path."""
    rtts = max(5, min(2000, int(budget_s * 2e9 / max(n, 1) / 2)))
    frames = max(4, min(2000, int(256 * (1 << 20) / max(n, 1))))
    return rtts, frames


# -- baselines -----------------------------------------------------------------------------------


def memcpy_row(n: int, device: str = "cpu") -> dict:
    import torch

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src)
    sync()
    reps = max(3, min(2000, int(2e9 / n)))
    best_pre = best_fresh = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync()
        best_pre = min(best_pre, (time.perf_counter() - t0) / reps)
        t0 = time.perf_counter()
        for _ in range(reps):
            d = torch.empty(n, dtype=torch.uint8, device=device)
            d.copy_(src)
            del d
        sync()
        best_fresh = min(best_fresh, (time.perf_counter() - t0) / reps)
    return {"memcpy_gbs": n / best_pre / 1e9, "memcpy_fresh_gbs": n / best_fresh / 1e9}


def gloo_peer(rank: int, port: int, sizes: list[int], budget_s: float) -> dict:
    import datetime

    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)  # fmt: skip
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=120)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bench", store), rank, 2, opts)
    peer = 1 - rank
    out = {}
    ack = torch.zeros(1, dtype=torch.uint8)
    for n in sizes:
        rtts, frames = plan(n, budget_s)
        buf = torch.ones(n, dtype=torch.uint8)
        times = []
        for _ in range(rtts):
            t0 = time.perf_counter()
            if rank == 0:
                pg.send([buf], peer, 1).wait()
                pg.recv([buf], peer, 2).wait()
            else:
                pg.recv([buf], peer, 1).wait()
                pg.send([buf], peer, 2).wait()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(frames):
            (pg.send if rank == 0 else pg.recv)([buf], peer, 3).wait()
        (pg.recv if rank == 0 else pg.send)([ack], peer, 4).wait()
        out[n] = {
            "rtt_us": statistics.median(times) * 1e6,
            "gbs": n * frames / (time.perf_counter() - t0) / 1e9,
        }
    return out


# -- transports ------------------------------------------------------------------------------


def transport_peer(
    name: str, rank: int, port: int, sizes: list[int], budget_s: float, options: dict, device: str
) -> dict:
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda" and name == "nixl":
        options = {"device": "cuda"} | options

    from afdserve.transport.message import Message, MsgType
    from afdserve.transport.registry import create_transport
    from afdserve.transport.staging import to_device

    tr = create_transport(
        name,
        rank,
        2,
        rendezvous=f"127.0.0.1:{port}",
        connect_timeout_s=120,
        send_timeout_s=120,
        **options,
    )
    peer, step, out, T = 1 - rank, 0, {}, 120.0
    try:
        for n in ["hb"] + sizes:
            rtts, frames = plan(64 if n == "hb" else n, budget_s)
            x = None if n == "hb" else torch.ones(n // 4, dtype=torch.float32, device=dev)
            times = []
            for _ in range(rtts + 3):
                step += 1
                t0 = time.perf_counter()
                if n == "hb":
                    if rank == 0:
                        tr.send(peer, Message(MsgType.HEARTBEAT, step, sender=rank))
                        tr.recv(peer, MsgType.HEARTBEAT, step, timeout_s=T)
                    else:
                        tr.recv(peer, MsgType.HEARTBEAT, step, timeout_s=T)
                        tr.send(peer, Message(MsgType.HEARTBEAT, step, sender=rank))
                elif rank == 0:
                    tr.send(peer, Message(MsgType.ACTIVATION_TRANSFER, step, sender=rank, tensor=x))
                    to_device(
                        tr.recv(peer, MsgType.ACTIVATION_RESULT, step, timeout_s=T).tensor, dev
                    )
                    sync()
                else:
                    m = tr.recv(peer, MsgType.ACTIVATION_TRANSFER, step, timeout_s=T)
                    t = to_device(m.tensor, dev)  # [n/4] where the application wants it
                    tr.send(peer, Message(MsgType.ACTIVATION_RESULT, step, sender=rank, tensor=t))
                times.append(time.perf_counter() - t0)
            row = {"rtt_us": statistics.median(times[3:]) * 1e6}
            if n != "hb":
                first = step + 1
                t0 = time.perf_counter()
                for i in range(frames):
                    if rank == 0:
                        tr.send(
                            peer,
                            Message(MsgType.ACTIVATION_TRANSFER, first + i, sender=rank, tensor=x),
                        )
                    else:
                        m = tr.recv(peer, MsgType.ACTIVATION_TRANSFER, first + i, timeout_s=T)
                        to_device(m.tensor, dev)
                sync()
                step = first + frames
                if rank == 0:
                    tr.recv(peer, MsgType.HEARTBEAT, step, timeout_s=T)
                else:
                    tr.send(peer, Message(MsgType.HEARTBEAT, step, sender=rank))
                row["gbs"] = n * frames / (time.perf_counter() - t0) / 1e9
            out[n] = row
    finally:
        time.sleep(0.2)
        tr.close()
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if not args.no_pin:
        pin(args.rank)
    sizes = [parse_size(s) for s in args.sizes]
    if args.child == "gloo":
        res = gloo_peer(args.rank, args.port, sizes, args.budget)
    else:
        res = transport_peer(
            args.child, args.rank, args.port, sizes, args.budget, json.loads(args.options),
            args.device,
        )  # fmt: skip
    if args.rank == 0:
        print("RESULT " + json.dumps({str(k): v for k, v in res.items()}), flush=True)


def run_pair(kind: str, args: argparse.Namespace) -> dict | str:
    port = free_port()
    cmd = [sys.executable, __file__, "--child", kind, "--port", str(port), "--budget", str(args.budget),
           "--options", json.dumps(args.opts.get(kind, {})), "--sizes", *args.sizes,
           "--device", args.device,
           *(["--no-pin"] if args.no_pin else [])]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=args.timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        return f"timed out after {args.timeout}s"
    if any(p.returncode for p in procs):
        err = next((e for p, (_, e) in zip(procs, outs, strict=True) if p.returncode), "")
        return "failed: " + (err.strip().splitlines() or ["?"])[-1][:200]
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _number(value: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _device_name(device: str) -> str:
    import torch

    return f"{device} ({torch.cuda.get_device_name(0)})" if device != "cpu" else "cpu"


def fmt_size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", nargs="+", default=TRANSPORTS, choices=TRANSPORTS)
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--budget", type=float, default=0.5, help="rough seconds per size and mode")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-gloo", action="store_true", help="skip the raw gloo baseline")
    ap.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KIND.NAME=VALUE",
        help="a transport option, e.g. shm.ring_bytes=4194304 (numbers or strings)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the tensors live")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-pin", action="store_true", help="let the OS place the two processes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.opts = {}
    for spec in args.opt:
        key, _, value = spec.partition("=")
        kind, _, name = key.partition(".")
        args.opts.setdefault(kind, {})[name] = _number(value)
    sizes = [parse_size(s) for s in args.sizes]
    import torch

    torch.set_num_threads(1)
    allowed = os.sched_getaffinity(0)
    if not args.no_pin:
        pin(0)
    results: dict[str, dict | str] = {"memcpy": {str(n): memcpy_row(n, args.device) for n in sizes}}
    os.sched_setaffinity(0, allowed)  # the children inherit the mask: give them every core back
    no_gloo = args.no_gloo or args.device != "cpu"
    kinds = ([] if no_gloo else ["gloo"]) + list(args.transports)
    if "nixl" in kinds:
        from afdserve.transport.nixl import nixl_available

        if not nixl_available():
            results["nixl"] = "skipped: nixl is not installed (pip install --no-deps nixl-cu12)"
            kinds.remove("nixl")
    for kind in kinds:
        print(f"running {kind} ...", file=sys.stderr, flush=True)
        results[kind] = run_pair(kind, args)
    print(
        f"host: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; torch threads 1; "
        f"processes {'not pinned' if args.no_pin else 'pinned to 2 cores'}; "
        f"tensors on {_device_name(args.device)}"
    )
    print(
        "round trip (median, us) for N bytes each way; bandwidth (GB/s) one way; memcpy GB/s in-process"
    )
    header = f"{'size':>6} {'memcpy':>7} {'fresh':>6} | " + " | ".join(
        f"{k + ' rtt':>10} {k + ' GB/s':>9}" for k in kinds
    )
    print(header)
    print("-" * len(header))
    hb = " | ".join(
        f"{results[k]['hb']['rtt_us']:>10.1f} {'':>9}"
        if isinstance(results[k], dict) and "hb" in results[k]
        else f"{'':>10} {'':>9}"
        for k in kinds
    )
    print(f"{'hb':>6} {'':>7} {'':>6} | {hb}")
    for n in sizes:
        mc = results["memcpy"][str(n)]
        cells = []
        for k in kinds:
            r = results[k]
            if isinstance(r, dict) and str(n) in r:
                cells.append(f"{r[str(n)]['rtt_us']:>10.1f} {r[str(n)]['gbs']:>9.2f}")
            else:
                cells.append(f"{'-':>10} {'-':>9}")
        print(
            f"{fmt_size(n):>6} {mc['memcpy_gbs']:>7.2f} {mc['memcpy_fresh_gbs']:>6.2f} | "
            + " | ".join(cells)
        )
    for k in kinds + (["nixl"] if isinstance(results.get("nixl"), str) else []):
        if isinstance(results.get(k), str):
            print(f"{k}: {results[k]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
