"""Chaos benchmark: a steady streaming load on `afdserve serve` (2A1F worker processes) while
each role in turn is killed, stopped, or sent an oversized request; per fault, how many
requests completed with the undisturbed tokens, how many were lost or errored, and how long
/health took to say so (detection) and to be healthy again (recovery).

    python benchmarks/bench_chaos.py [--transport shm] [--streams 8] [--stop-s 20]

The server runs in the exact mode (--batch-invariant), so a request that moved to another
attention worker (replayed from its prompt and the tokens it had) must give exactly the
tokens of an undisturbed run; greedy, EOS ignored. Faults, in order, each after a few seconds
of steady load: SIGKILL of attention worker 0, SIGSTOP of attention worker 1 for --stop-s,
SIGKILL of the FFN worker, SIGSTOP of the FFN worker for --stop-s, and a --big-mb text prompt
(which must be refused with 413 while the streams go on). A request counts for a fault when
it was in flight at any time between the fault and the recovery. Every server and worker
process is ours and bound to 127.0.0.1; all are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from afdserve.transport.options import free_port, free_port_run

SERVED = "chaos"


@dataclass
class Outcome:
    prompt: int
    start: float
    end: float = 0.0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the server's worker processes (from /proc: no psutil needed)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid or b"worker" not in cmd:
            continue
        out[int(cmd[cmd.index(b"--rank") + 1])] = int(entry)
    return out


class Supervisor:
    """Workers started by hand (`afdserve worker --front`), and a loop that starts one again
    whenever it exits, as systemd's Restart=always or a Kubernetes pod would."""

    def __init__(self, front: int, world: int, logdir: Path, env: dict) -> None:
        self.cmds = [
            [sys.executable, "-m", "afdserve.cli", "worker", "--front", f"127.0.0.1:{front}"]
            + ["--rank", str(k), "--host", "127.0.0.1"]
            for k in range(world)
        ]
        self.logdir, self.env = logdir, env
        self.procs = [self._start(k) for k in range(world)]
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _start(self, k: int) -> subprocess.Popen:
        with open(self.logdir / f"worker-{k}.log", "ab") as logf:
            return subprocess.Popen(
                self.cmds[k], stdout=logf, stderr=subprocess.STDOUT, env=self.env
            )

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for k, p in enumerate(self.procs):
                if p.poll() is not None:
                    self.restarts += 1
                    self.procs[k] = self._start(k)

    def pids(self) -> dict[int, int]:
        return {k: p.pid for k, p in enumerate(self.procs)}

    def stop_restarting(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def reap(self) -> None:
        """After the front's shutdown: wait for every worker to exit (kill the rest)."""
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


class Load:
    """`streams` threads, each streaming one greedy completion after another."""

    def __init__(self, url: str, prompts: list[list[int]], streams: int, max_tokens: int):
        self.url, self.prompts, self.max_tokens = url, prompts, max_tokens
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(120.0)) as client:
            while not self._stop.is_set():
                with self._lock:
                    i = self._next % len(self.prompts)
                    self._next += 1
                out = complete(client, self.url, self.prompts[i], self.max_tokens, i)
                with self._lock:
                    self.outcomes.append(out)


def complete(client: httpx.Client, url: str, prompt: list[int], n: int, i: int) -> Outcome:
    out = Outcome(i, time.monotonic())
    body = {
        "model": SERVED,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}"
                resp.read()
            else:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out.error = str(chunk["error"].get("message", chunk["error"]))[:80]
                        continue
                    for c in chunk.get("choices", []):
                        out.tokens.extend(c.get("token_ids") or [])
                        out.finish = c.get("finish_reason") or out.finish
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:80]
    out.end = time.monotonic()
    return out


class Health:
    """Polls /health every 50 ms: (time, 'ok' | 'degraded' | 'down')."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.wait(0.05):
                try:
                    r = client.get(self.url + "/health")
                    state = "down" if r.status_code != 200 else ("degraded" if r.content else "ok")
                except httpx.HTTPError:
                    state = "down"
                self.samples.append((time.monotonic(), state))

    def first(self, after: float, want) -> float | None:
        return next((t for t, s in list(self.samples) if t >= after and want(s)), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model dir (default: a random small llama)")
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp", "torch"])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stop-s", type=float, default=20.0, help="how long a SIGSTOP lasts")
    ap.add_argument("--steady-s", type=float, default=4.0, help="load before each fault")
    ap.add_argument("--big-mb", type=float, default=40.0, help="the oversized prompt's size")
    ap.add_argument(
        "--hand-started",
        action="store_true",
        help="workers started by hand (serve --front) and restarted by a supervisor loop here",
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="afd-chaos-")
    model = args.model
    if not model:
        from afdserve.model.make_model import make_model

        model = str(make_model("llama", "small", 0, Path(tmp) / "llama-small"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tmp) / "serve.log"
    cmd = [sys.executable, "-m", "afdserve.cli", "serve", model, "--transport", args.transport]
    cmd += ["--attention-workers", "2", "--microbatches", "2", "--batch-invariant"]
    cmd += ["--port", str(port), "--served-model-name", SERVED]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    supervisor = None
    if args.hand_started:
        front = free_port_run(5)
        cmd += ["--front", f"127.0.0.1:{front}"]
        supervisor = Supervisor(front, 3, Path(tmp), env)
    with open(log, "wb") as logf:
        server = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    stopped: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up: " + log.read_text()[-2000:])
            time.sleep(0.2)
        prompts = [[(7 * k + j) % 300 + 3 for j in range(8 + 13 * k)] for k in range(8)]
        with httpx.Client(timeout=120) as client:  # the undisturbed tokens, one at a time
            ref = [complete(client, url, p, args.max_tokens, i) for i, p in enumerate(prompts)]
        assert all(r.finish == "length" and not r.error for r in ref), ref
        health = Health(url)
        load = Load(url, prompts, args.streams, args.max_tokens)
        load.start()

        def inject(fault: str) -> None:
            ranks = supervisor.pids() if supervisor else _children(server.pid)
            if fault == "big prompt":
                body = b'{"model":"chaos","prompt":"' + b"a" * int(args.big_mb * 2**20) + b'"}'
                r = httpx.post(
                    url + "/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=120,
                )
                print(f"  {args.big_mb:.0f} MB prompt: HTTP {r.status_code}", flush=True)
                return
            what, role = fault.split(" ", 1)
            pid = ranks[{"attention 0": 0, "attention 1": 1, "FFN": 2}[role]]
            if what == "SIGKILL":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                threading.Timer(args.stop_s, lambda: os.kill(pid, signal.SIGCONT)).start()

        faults = ["SIGKILL attention 0", "SIGSTOP attention 1", "SIGKILL FFN", "SIGSTOP FFN"]
        faults.append("big prompt")
        rows = []
        for fault in faults:
            time.sleep(args.steady_s)
            t0 = time.monotonic()
            print(f"{fault} ...", flush=True)
            inject(fault)
            detect = health.first(t0, lambda s: s != "ok")
            give_up = t0 + args.stop_s + 120
            while time.monotonic() < give_up:
                detect = detect or health.first(t0, lambda s: s != "ok")
                hold = args.stop_s if fault.startswith("SIGSTOP") else 0.0
                if time.monotonic() > t0 + hold + 1.0 and (
                    health.first(max(t0 + hold, detect or t0), lambda s: s == "ok")
                ):
                    break
                time.sleep(0.1)
            recovered = health.first(max(t0, detect or t0), lambda s: s == "ok")
            end = (recovered or time.monotonic()) + 2.0
            time.sleep(max(0.0, end - time.monotonic()))
            rows.append((fault, t0, detect, recovered, end))
        time.sleep(2.0)
        load.stop()
        health.close()
        print()
        how = "hand-started workers, restarted by a supervisor" if supervisor else "spawned"
        print(
            f"transport {args.transport}, 2A1F ({how}), {args.streams} streams, "
            f"{args.max_tokens} tokens"
        )
        print("| fault | requests | completed | wrong tokens | errored | detection | recovery |")
        print("|---|---|---|---|---|---|---|")
        for fault, t0, detect, recovered, end in rows:
            hit = [o for o in load.outcomes if o.start <= end and o.end >= t0]
            ok = [o for o in hit if not o.error and o.finish == "length"]
            wrong = [o for o in ok if o.tokens != ref[o.prompt].tokens]
            bad = [o for o in hit if o not in ok]
            det = f"{detect - t0:.2f} s" if detect else "never"
            rec = (
                f"{recovered - t0:.2f} s"
                if recovered and detect
                else "-"
                if not detect
                else "never"
            )
            print(
                f"| {fault} | {len(hit)} | {len(ok) - len(wrong)} | {len(wrong)} | {len(bad)} "
                f"| {det} | {rec} |"
            )
            for o in bad[:3]:
                print(f"|   e.g. | {o.error or o.finish} | | | | | |")
        total = load.outcomes
        print(f"all requests: {len(total)}, errored {sum(1 for o in total if o.error)}")
    finally:
        if supervisor is not None:
            supervisor.stop_restarting()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        if supervisor is not None:
            supervisor.reap()


if __name__ == "__main__":
    main()
