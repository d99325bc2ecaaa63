"""The front's lease (launch/front_lease.py): a front whose keeper stopped renewing its lease
stops itself (SIGTERM to its own process, so `afdserve serve` drains and exits), and a run
directory names a running front only when its pid is a live front of ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from afdserve.launch.front_lease import LEASE_FILE, PID_FILE, running_front, watch_lease

SLEEPER = """
import sys, threading, time
from pathlib import Path
from afdserve.launch.front_lease import watch_lease
threading.Thread(target=watch_lease, args=(Path(sys.argv[1]), 1.0), daemon=True).start()
print("watching", flush=True)
time.sleep(120)
"""


def test_a_front_stops_once_its_lease_is_not_renewed(tmp_path):
    lease = tmp_path / LEASE_FILE
    lease.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, str(lease)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "watching"
        for _ in range(4):  # renewed: it runs on
            os.utime(lease)
            time.sleep(0.5)
        assert proc.poll() is None
        assert proc.wait(30) == -signal.SIGTERM  # then not renewed: it stops itself
    finally:
        proc.kill()
        proc.wait()


def test_watch_lease_is_what_the_front_runs():
    from afdserve.launch import front_lease_cli

    assert front_lease_cli.watch_lease is watch_lease


def test_run_dir_names_only_a_live_front_of_ours(tmp_path):
    assert running_front(tmp_path) is None  # no pid file
    (tmp_path / PID_FILE).write_text("not a pid")
    assert running_front(tmp_path) is None
    (tmp_path / PID_FILE).write_text(str(os.getpid()))  # alive, but pytest is no front
    assert running_front(tmp_path) is None
    code = "import time; time.sleep(60)  # afdserve.launch.front_lease"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        (tmp_path / PID_FILE).write_text(str(proc.pid))
        assert running_front(tmp_path) == proc.pid
        proc.kill()
        proc.wait()
        assert running_front(tmp_path) is None  # gone
    finally:
        proc.kill()
        proc.wait()


def test_a_keeper_keeps_only_a_front_of_its_own_flags(tmp_path, capsys):
    """A front of another job (other flags, still within its lease) is not kept: exit 2."""
    import json

    from afdserve.launch.front_lease import ARGV_FILE, keep_front

    code = "import time; time.sleep(60)  # afdserve.launch.front_lease"
    proc = subprocess.Popen([sys.executable, "-c", code])
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        (tmp_path / PID_FILE).write_text(str(proc.pid))
        (tmp_path / ARGV_FILE).write_text(json.dumps(["--port", "1"]))
        assert keep_front(tmp_path, ["--port", "2"], 5.0) == 2
        assert "runs with other flags" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        proc.kill()
        proc.wait()
