"""A front that outlives its launcher rank's restarts, held by a lease.

torchrun's elastic agent restarts every process of its node when one dies, and under a c10d
rendezvous every agent of the world restarts its node's processes when any one does: a front
run as a plain torchrun rank would die with every worker crash and take its HTTP clients'
requests with it. So the front's rank is only its *keeper*: it starts the front in a session of
its own (out of reach of the agent's process-group kill), records its pid in a run directory,
renews a lease file every `RENEW_S`, copies the front's log to its own output, and ends when the
front ends (with its exit code, so the launcher sees a dead front as a dead rank). A restarted
keeper finds the front alive by its pid file and keeps it: in-flight requests live on, and the
workers restarted with the keeper rejoin it through the membership path (multiproc.py). When no
keeper renews the lease for `timeout_s` (the launcher stopped for good), the front stops itself
as on SIGTERM (drain, then exit): a bounded orphan, never a permanent one.

`python -m afdserve.launch.front_lease_cli --lease FILE --timeout S -- <afdserve serve flags>`
is the front side: `afdserve serve` plus the thread that watches the lease (`watch_lease`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("afdserve.front_lease")

RENEW_S = 0.5
"""How often a keeper renews the lease (and checks its front)."""

PID_FILE = "front.pid"
LEASE_FILE = "front.lease"
LOG_FILE = "front.log"
ARGV_FILE = "front.argv"
"""The `afdserve serve` flags the running front was started with (JSON): a keeper keeps only a
front of its own flags."""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) front of ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return state != ["Z"] and "afdserve.launch.front_lease" in _cmdline(pid)


def running_front(run_dir: Path) -> int | None:
    """The pid of the front this run directory holds, if it is still running."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid) else None


def start_front(run_dir: Path, serve_argv: list[str], timeout_s: float) -> subprocess.Popen:
    """Start the front in a new session, logging to run_dir/front.log; its pid is recorded."""
    lease = run_dir / LEASE_FILE
    lease.touch()
    cmd = [
        sys.executable,
        "-m",
        "afdserve.launch.front_lease_cli",
        "--lease",
        str(lease),
        "--timeout",
        str(timeout_s),
        "--",
        *serve_argv,
    ]
    with open(run_dir / LOG_FILE, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    (run_dir / ARGV_FILE).write_text(json.dumps(serve_argv))
    (run_dir / PID_FILE).write_text(str(proc.pid))
    return proc


def keep_front(run_dir: Path, serve_argv: list[str], timeout_s: float) -> int:
    """The keeper: start the front (or keep the one already running), renew its lease while it
    runs, and return its exit code once it ends (1 when it was not our child). SIGTERM and
    SIGINT end the keeper alone; the front then stops when its lease runs out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pid = running_front(run_dir)
    child = None
    logfile = run_dir / LOG_FILE
    if pid is None:
        child = start_front(run_dir, serve_argv, timeout_s)
        pid, offset = child.pid, logfile.stat().st_size if logfile.exists() else 0
        print(f"afdserve front keeper: started the front (pid {pid}, log {logfile})", flush=True)
    else:
        try:
            theirs = json.loads((run_dir / ARGV_FILE).read_text())
        except (OSError, ValueError):
            theirs = None
        if theirs != serve_argv:  # another job's front, within its lease: not ours to keep
            print(
                f"afdserve front keeper: error: the front in {run_dir} (pid {pid}) runs with "
                f"other flags ({theirs}); it stops within {timeout_s:.0f}s of its last keeper, "
                "or give this job another --run-dir and --front-port",
                file=sys.stderr,
                flush=True,
            )
            return 2
        offset = logfile.stat().st_size if logfile.exists() else 0
        print(f"afdserve front keeper: the front (pid {pid}) runs on; keeping it", flush=True)
    lease = run_dir / LEASE_FILE
    while not stop.is_set():
        os.utime(lease) if lease.exists() else lease.touch()
        offset = _copy_log(logfile, offset)
        if child is not None:
            code = child.poll()
            if code is not None:
                _copy_log(logfile, offset)
                print(f"afdserve front keeper: the front exited with code {code}", flush=True)
                return code
        elif not _running(pid):
            print("afdserve front keeper: the front is gone", flush=True)
            return 1
        stop.wait(RENEW_S)
    print("afdserve front keeper: stopped; the front runs on until its lease ends", flush=True)
    return 0


def _copy_log(logfile: Path, offset: int) -> int:
    """Copy what the front logged since `offset` to this keeper's stdout (the launcher's log)."""
    try:
        with open(logfile, "rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except OSError:
        return offset
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return offset + len(data)


def watch_lease(lease: Path, timeout_s: float) -> None:
    """The front's side: stop this process (as SIGTERM does: drain, then exit) once the lease
    has not been renewed for `timeout_s`; checked every second."""
    while True:
        time.sleep(1.0)
        try:
            age = time.time() - lease.stat().st_mtime
        except OSError:
            age = float("inf")
        if age > timeout_s:
            log.warning("no keeper renewed the lease for %.0fs: the front stops", age)
            os.kill(os.getpid(), signal.SIGTERM)
            return
