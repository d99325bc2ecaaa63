"""A 2A1F group launched by Ray on 127.0.0.1: a head started with `ray start --head
--node-ip-address 127.0.0.1`, the driver (`python -m afdserve.launch.ray --address ...`) runs the
front and one actor per worker in a placement group; the group serves the aggregated engine's
tokens; SIGKILL of the busier attention worker's actor mid-stream: its worker dies with it, Ray
restarts the actor, the new worker rejoins the front, every stream in flight ends with the
undisturbed tokens and the group serves again; then SIGKILL of the other one's worker process
alone: its actor exits with it, Ray restarts the actor, the new worker rejoins.

This workplace's tests may reach loopback only. Ray's gcs_server, raylet and core workers bind
their gRPC ports on the wildcard address (Ray has no setting for it: `--node-ip-address
127.0.0.1`, `include_dashboard=False` and the worker port range do not change it), so the test
first lists every listening socket of the cluster's processes and skips unless each is on
loopback, or on the wildcard inside a network namespace whose only interface is `lo`. Run it
so: `unshare -n sh -c 'ip link set lo up && pytest tests/launch/test_ray_launcher.py'` (root).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from afdserve import LLM, SamplingParams
from afdserve.transport.options import free_port_run
from tests.launch.test_torchrun import (
    MAX_TOKENS,
    PROMPTS,
    Stream,
    _alive,
    _complete,
    _descendants,
    _proc_table,
)

ray = pytest.importorskip("ray")
pytest.importorskip("psutil")  # the sockets check (accelerate, a test dependency, brings it)

pytestmark = pytest.mark.slow  # a Ray head, a driver and three workers: about a minute here


@pytest.fixture(scope="module")
def reference(tiny_model_dirs) -> list[list[int]]:
    """The aggregated engine's greedy tokens (exact mode, as the group runs it)."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(tiny_model_dirs["llama"]), mode="aggregated", batch_invariant=True) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, params)]


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP/UDP socket listening in `pids` (psutil, as `ss -ltnup`
    lists them)."""
    import psutil

    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.laddr and (c.status == psutil.CONN_LISTEN or not c.raddr):
            out.append((c.laddr.ip, c.laddr.port, c.pid))
    return out


def _only_loopback_interface() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _off_loopback(socks: list[tuple[str, int, int]]) -> list[str]:
    """The sockets reachable from beyond this host: bound to a non-loopback address, or to the
    wildcard while an interface other than `lo` exists."""
    bad = []
    for addr, port, pid in socks:
        ip = ipaddress.ip_address(addr.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        if ip.is_loopback or (ip.is_unspecified and _only_loopback_interface()):
            continue
        bad.append(f"{addr}:{port} (pid {pid} {_proc_table().get(pid, (0, '?'))[1][:60]})")
    return bad


class RayHead:
    """`ray start --head --block` on 127.0.0.1 in a session of its own, in a temp dir of its own
    (so it never meets another Ray on this machine); killed, with every descendant, at close."""

    def __init__(self) -> None:
        self.port = free_port_run(1)
        while 10002 <= self.port <= 19999:  # Ray's own worker port range: it refuses those
            self.port = free_port_run(1)
        self.temp = Path(tempfile.mkdtemp(prefix="afdray", dir="/tmp"))  # short: unix socket paths
        ray_bin = Path(sys.executable).with_name("ray")
        token = self.temp / "auth_token"  # this cluster's own token (not ~/.ray's)
        token.write_text(secrets.token_hex(32))
        self.env = {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        env = os.environ | self.env | {"OMP_NUM_THREADS": "1"}
        self.log = self.temp / "head.log"
        cmd = [
            str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(self.port), "--num-cpus", "3", "--num-gpus", "0",
            "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(self.temp),
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.address = f"127.0.0.1:{self.port}"

    def pids(self) -> set[int]:
        return {self.proc.pid, *_descendants([self.proc.pid])}

    def wait_up(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(p == self.port for _, p, _ in _listening(self.pids())):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no Ray head\n" + self.log.read_text()[-3000:]
            time.sleep(0.3)
        time.sleep(2.0)  # the raylet and its agents start after the GCS

    def close(self) -> list[int]:
        every = self.pids()
        for pid in every:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in every) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.temp, ignore_errors=True)
        return [p for p in every if _alive(p)]


class RayDriver:
    """`python -m afdserve.launch.ray --address HEAD` running a 2A1F group."""

    def __init__(self, head: RayHead, tmp: Path, model_dir: Path) -> None:
        self.front_port = free_port_run(5)
        self.http = f"http://127.0.0.1:{free_port_run(1)}"
        self.log = tmp / "driver.log"
        cmd = [
            sys.executable, "-m", "afdserve.launch.ray", "--address", head.address,
            "--node-ip", "127.0.0.1", "--roles", "front,attention:2,ffn:1",
            "--front-port", str(self.front_port), "--max-restarts", "2", "--ray-timeout", "90",
            "--",
            "--model", str(model_dir), "--port", self.http.rpartition(":")[2], "--threads", "1",
            "--batch-invariant", "--microbatches", "1", "--sync-timeout", "5",
            "--startup-timeout", "120", "--log-level", "warning", "--served-model-name", "m",
        ]  # fmt: skip
        env = os.environ | head.env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def wait_healthy(self, timeout_s: float = 150.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.http + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the group did not come up\n" + self.output()
            time.sleep(0.3)

    def worker(self, rank: int) -> tuple[int, int] | None:
        """(worker pid, its parent: the actor's pid) of worker `rank`, if one runs."""
        want = f" afdserve.cli worker --front 127.0.0.1:{self.front_port} --rank {rank} "
        for pid, (ppid, cmd) in _proc_table().items():
            if want in cmd and _alive(pid):
                return pid, ppid
        return None

    def workers(self) -> dict:
        return httpx.get(self.http + "/admin/workers", timeout=10).json()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.http + "/metrics", timeout=10).text.splitlines():
            if not line.startswith("#") and name in line.split("{")[0].split(" ")[0]:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the driver (the front drains, the actors stop, bounded); SIGKILL after."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def _until(cond, timeout_s: float, what: str, driver: RayDriver) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, (
            f"{what} not within {timeout_s:.0f}s\n" + driver.output()
        )
        time.sleep(0.2)


def test_ray_group_serves_the_aggregated_tokens_and_recovers_a_killed_actor(
    tiny_model_dirs, reference, tmp_path
):
    head = RayHead()
    driver = None
    try:
        head.wait_up()
        bad = _off_loopback(_listening(head.pids()))
        if bad:
            pytest.skip(
                "the Ray cluster listens beyond loopback (this workplace's tests may reach "
                "loopback only; run it in a network namespace with only lo, see the module "
                "docstring): " + ", ".join(bad[:6])
            )
        driver = RayDriver(head, tmp_path, tiny_model_dirs["llama"])
        driver.wait_healthy()
        # the actors and their workers are up now: every socket of theirs on loopback too
        group = head.pids() | {driver.proc.pid, *_descendants([driver.proc.pid])}
        assert _off_loopback(_listening(group)) == []
        assert _complete(driver.http, PROMPTS[0]) == reference[0]
        streams = [Stream(driver.http, p) for p in PROMPTS]
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(120), driver.output()
        loads = [w["running"] for w in driver.workers()["attention"]]
        k = loads.index(max(loads))  # the attention worker with the most requests in flight
        victim = driver.worker(k)
        assert victim is not None, driver.output()
        worker_pid, actor_pid = victim
        assert "WorkerSupervisor" in _proc_table()[actor_pid][1]  # an actor runs it
        running = loads[k]
        assert running > 0 and not all(s.finish for s in streams)  # requests in flight on it
        os.kill(actor_pid, signal.SIGKILL)  # the actor: its worker dies with it, Ray restarts it
        for s in streams:
            s.join(180)
            assert not s.is_alive(), driver.output()
        assert [s.errors for s in streams] == [[]] * len(PROMPTS), driver.output()
        assert [s.tokens for s in streams] == reference, driver.output()  # none lost or changed
        assert driver.metric("requests_migrated") >= running
        _until(lambda: not _alive(worker_pid), 10, "the dead actor's worker gone", driver)
        _until(
            lambda: (driver.worker(k) or (worker_pid, actor_pid))[1] != actor_pid,
            90,
            f"a new actor (restarted by Ray) running attention worker {k}",
            driver,
        )
        _until(lambda: not driver.workers()["problems"], 120, "a healthy group again", driver)
        assert driver.metric("worker_restarts") >= 1
        again = [Stream(driver.http, p) for p in PROMPTS[:4]]
        for s in again:
            s.start()
        for s in again:
            s.join(180)
        assert [s.tokens for s in again] == reference[:4], driver.output()
        assert [s.errors for s in again] == [[]] * 4
        # the other way round: a worker that dies ends its actor, and Ray restarts both
        w0, a0 = driver.worker(1 - k) or (0, 0)
        assert w0, driver.output()
        restarts = driver.metric("worker_restarts")
        os.kill(w0, signal.SIGKILL)
        _until(
            lambda: (driver.worker(1 - k) or (w0, a0))[1] != a0,
            90,
            f"a new actor (restarted by Ray) running attention worker {1 - k}",
            driver,
        )
        _until(lambda: driver.metric("worker_restarts") > restarts, 60, "its rejoin", driver)
        _until(lambda: not driver.workers()["problems"], 120, "a healthy group again", driver)
        assert _complete(driver.http, PROMPTS[1]) == reference[1]
        # a bounded, clean stop: the driver ends, and with it every worker
        assert driver.stop() is not None, driver.output()
        _until(lambda: driver.worker(0) is None and driver.worker(1) is None, 30, "no worker",
               driver)  # fmt: skip
    finally:
        if driver is not None and driver.proc.poll() is None:
            os.killpg(driver.proc.pid, signal.SIGKILL)
            driver.proc.wait(10)
        left = head.close()
    assert left == []
