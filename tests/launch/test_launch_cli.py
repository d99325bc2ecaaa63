"""`afdserve launch` as a user runs it: a real process that starts the workers, generates, and
leaves nothing behind; Ctrl-C shuts a waiting group down cleanly; a bad device is one line."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .test_multiprocess import _alive, _segments_of

pytestmark = pytest.mark.timeout(180)


def _launch(model_dir, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "afdserve.cli", "launch", "--model", str(model_dir),
           "--attention-workers", "2", "--transport", "shm", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _pids(line: str) -> list[int]:
    m = re.search(r"\(pids (\[[0-9, ]+\])\)", line)
    assert m, line
    return ast.literal_eval(m.group(1))


def _gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def test_launch_generates_and_leaves_nothing_behind(tiny_model_dirs):
    p = _launch(
        tiny_model_dirs["llama"], "--prompt", "Hello", "--prompt", "AFD", "--max-tokens", "4"
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = out.strip().splitlines()
    assert "2 attention workers + 1 FFN worker over shm ready" in lines[0]
    pids = _pids(lines[0])
    assert len(pids) == 3
    assert [ln.split(" -> ")[0] for ln in lines[1:]] == ["'Hello'", "'AFD'"]
    assert _gone(pids) and not _segments_of(pids)


def test_ctrl_c_shuts_a_waiting_group_down_cleanly(tiny_model_dirs):
    p = _launch(tiny_model_dirs["llama"])
    try:
        first = p.stdout.readline()  # the ready line
        pids = _pids(first)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGUSR1)  # the front prints its threads' stacks (faulthandler)
            time.sleep(1.0)
            p.kill()
            _, err = p.communicate()
            pytest.fail(f"the front did not shut down within 60 s after Ctrl-C:\n{err}")
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert "shutting down" in out
    assert _gone(pids) and not _segments_of(pids)


def test_bad_device_is_one_line_and_no_traceback(tiny_model_dirs):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"
    p = _launch(tiny_model_dirs["llama"], "--device", missing, "--prompt", "hi")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afdserve launch: error:"), err
    assert "CUDA device" in lines[0]
