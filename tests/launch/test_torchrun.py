"""A 2A1F group launched by torchrun on 127.0.0.1: two agents ("nodes") of two ranks each
(node 0: the front and attention worker 0; node 1: attention worker 1 and the FFN worker),
serving the aggregated engine's tokens; SIGKILL of attention worker 1 mid-stream: torchrun's
elastic agent restarts its node's processes (under c10d, every node's), the restarted workers
rejoin the front under one epoch, every stream in flight ends with the undisturbed tokens, and
the group serves again. Every process is killed at the end, whatever happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from afdserve import LLM, SamplingParams
from afdserve.transport.options import free_port_run

PROMPTS = [[5, 9, 200], [7] * 21, [1, 2, 3, 4], [42] * 5, [100, 101, 102], [9] * 12]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def reference(tiny_model_dirs) -> list[list[int]]:
    """The aggregated engine's greedy tokens (exact mode, as the group runs: a request moved to
    another attention worker is recomputed there and must give the decode's tokens)."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(tiny_model_dirs["llama"]), mode="aggregated", batch_invariant=True) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, params)]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        out[int(d.name)] = (int(stat.rpartition(")")[2].split()[1]), cmd)
    return out


def _descendants(roots: list[int]) -> list[int]:
    table = _proc_table()
    found, frontier = [], list(roots)
    while frontier:
        p = frontier.pop()
        kids = [c for c, (pp, _) in table.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class TorchrunGroup:
    """Two torchrun agents on 127.0.0.1 running `python -m afdserve.launch.torchrun`."""

    def __init__(self, tmp: Path, model_dir: Path, rdzv: str) -> None:
        self.tmp = tmp
        self.front_port = free_port_run(5)  # events, 3 control ports, the rendezvous store
        self.http = f"http://127.0.0.1:{free_port_run(1)}"
        self.run_dir = tmp / "run"
        rdzv_port = free_port_run(1)
        if rdzv == "c10d":
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}"]
            where += ["--rdzv-id", f"afd-{rdzv_port}"]
        else:  # static: each agent its node rank, torchrun's store at MASTER_PORT
            where = ["--master-addr", "127.0.0.1", "--master-port", str(rdzv_port)]
        serve = [
            "--model", str(model_dir), "--port", self.http.rpartition(":")[2], "--threads", "1",
            "--batch-invariant", "--microbatches", "1", "--sync-timeout", "5",
            "--startup-timeout", "120", "--log-level", "warning", "--served-model-name", "m",
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.agents: list[subprocess.Popen] = []
        self.logs = [tmp / f"agent{n}.log" for n in range(2)]
        self._front_pid: int | None = None
        for n in range(2):
            node = ["--node-rank", str(n)] if rdzv == "static" else []
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "2", *node, *where, "--max-restarts", "2",
                "--monitor-interval", "0.5", "-m", "afdserve.launch.torchrun",
                "--roles", "front,attention:2,ffn:1", "--front-port", str(self.front_port),
                "--run-dir", str(self.run_dir), "--lease-timeout", "30", "--", *serve,
            ]  # fmt: skip
            with open(self.logs[n], "wb") as log:
                self.agents.append(
                    subprocess.Popen(
                        cmd,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )  # fmt: skip
                )

    def output(self) -> str:
        return "\n".join(
            f"== {p.name}\n" + p.read_text(errors="replace")[-4000:]
            for p in self.logs
            if p.exists()
        )

    def wait_healthy(self, timeout_s: float = 150.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert all(a.poll() is None for a in self.agents), self.output()
            try:
                if httpx.get(self.http + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the group did not come up\n" + self.output()
            time.sleep(0.3)

    def workers(self) -> dict:
        return httpx.get(self.http + "/admin/workers", timeout=10).json()

    def worker_pid(self, rank: int) -> int | None:
        # MASTER_ADDR, hence --front's host, is 127.0.0.1 or this host's name (c10d)
        want = f":{self.front_port} --rank {rank} "
        pids = [
            p
            for p, (_, cmd) in _proc_table().items()
            if " afdserve.cli worker --front " in cmd and want in cmd and _alive(p)
        ]
        return pids[0] if pids else None

    def metric(self, name: str) -> float:
        for line in httpx.get(self.http + "/metrics", timeout=10).text.splitlines():
            if not line.startswith("#") and name in line.split("{")[0].split(" ")[0]:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def close(self) -> list[int]:
        """Kill every process of the group (the agents' sessions, their workers' sessions and
        the front's); the pids that were still alive after it (none)."""
        try:
            self._front_pid = int((self.run_dir / "front.pid").read_text())
        except (OSError, ValueError):
            pass
        roots = [a.pid for a in self.agents] + ([self._front_pid] if self._front_pid else [])
        every = roots + _descendants(roots)
        for pid in every:
            try:
                os.killpg(pid, signal.SIGKILL)  # torchrun puts each worker in a session of its own
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for a in self.agents:
            a.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in every) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [p for p in every if _alive(p)]


class Stream(threading.Thread):
    """One streaming completion, keeping its token ids (and anything but tokens it got)."""

    def __init__(self, url: str, prompt: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt = url, prompt
        self.tokens: list[int] = []
        self.errors: list[str] = []
        self.finish: str | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = dict(
            model="m", prompt=self.prompt, max_tokens=MAX_TOKENS, temperature=0,
            ignore_eos=True, stream=True, return_token_ids=True,
        )  # fmt: skip
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=180) as r:
                if r.status_code != 200:
                    self.errors.append(f"HTTP {r.status_code}: {r.read()!r}")
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.errors.append(str(chunk["error"]))
                        continue
                    choice = chunk["choices"][0]
                    self.tokens += choice.get("token_ids") or []
                    self.finish = choice.get("finish_reason") or self.finish
                    if self.tokens:
                        self.started.set()
        except httpx.HTTPError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.started.set()


def _complete(url: str, prompt: list[int]) -> list[int]:
    body = dict(
        model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
        return_token_ids=True,
    )  # fmt: skip
    r = httpx.post(url + "/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _until(cond, timeout_s: float, what: str, group: TorchrunGroup) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f}s\n" + group.output()
        time.sleep(0.2)


def _kill_attention_worker_and_recover(group: TorchrunGroup, reference) -> None:
    group.wait_healthy()
    assert _complete(group.http, PROMPTS[0]) == reference[0]  # the group serves
    streams = [Stream(group.http, p) for p in PROMPTS]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), group.output()
    victim = group.worker_pid(1)  # attention worker 1, on node 1
    assert victim is not None, group.output()
    running = group.workers()["attention"][1]["running"]
    assert running > 0 and not all(s.finish for s in streams)  # requests in flight on it
    os.kill(victim, signal.SIGKILL)
    for s in streams:
        s.join(180)
        assert not s.is_alive(), group.output()
    got = [s.tokens for s in streams]
    assert [s.errors for s in streams] == [[]] * len(PROMPTS), group.output()
    assert got == reference, group.output()  # no request lost, none changed
    assert group.metric("requests_migrated") >= running
    # torchrun started it again; it rejoined (with whatever torchrun restarted beside it)
    _until(lambda: group.worker_pid(1) not in (None, victim), 60, "a new attention worker 1", group)
    _until(lambda: not group.workers()["problems"], 120, "a healthy group again", group)
    assert group.metric("worker_restarts") >= 1
    again = [Stream(group.http, p) for p in PROMPTS[:4]]
    for s in again:
        s.start()
    for s in again:
        s.join(180)
    assert [s.tokens for s in again] == reference[:4], group.output()
    assert [s.errors for s in again] == [[]] * 4


def test_torchrun_static_group_survives_a_killed_attention_worker(
    tiny_model_dirs, reference, tmp_path
):
    """Static rendezvous (--node-rank, MASTER_ADDR): only node 1's agent restarts its ranks
    (attention worker 1 and the FFN worker); the front and attention worker 0 run on."""
    group = TorchrunGroup(tmp_path, tiny_model_dirs["llama"], "static")
    try:
        front_pid_before = None
        group.wait_healthy()
        front_pid_before = int((group.run_dir / "front.pid").read_text())
        a0 = group.worker_pid(0)
        _kill_attention_worker_and_recover(group, reference)
        assert group.worker_pid(0) == a0  # node 0 was not restarted
        assert int((group.run_dir / "front.pid").read_text()) == front_pid_before
    finally:
        left = group.close()
    assert left == []


def test_torchrun_c10d_group_survives_a_killed_attention_worker(
    tiny_model_dirs, reference, tmp_path
):
    """c10d rendezvous: node 1's agent restarts and re-rendezvous, so node 0's agent restarts
    its ranks too (the front's keeper included): the front itself runs on (front_lease.py),
    every worker restarted at that moment is taken back under one epoch."""
    group = TorchrunGroup(tmp_path, tiny_model_dirs["llama"], "c10d")
    try:
        group.wait_healthy()
        front_pid_before = int((group.run_dir / "front.pid").read_text())
        _kill_attention_worker_and_recover(group, reference)
        assert int((group.run_dir / "front.pid").read_text()) == front_pid_before
        assert "runs on; keeping it" in group.logs[0].read_text() + group.logs[1].read_text()
    finally:
        left = group.close()
    assert left == []
