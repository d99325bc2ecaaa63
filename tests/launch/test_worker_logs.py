"""Spawned workers' logs: in the operator's directory when given, and rotated past a size
(launch/processes.py), without holes or a stopped writer."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from afdserve import LLM, SamplingParams
from afdserve.config import EngineConfig
from afdserve.errors import UserInputError
from afdserve.launch.processes import WorkerProcesses

WRITER = "import sys, time\nfor i in range(10**6):\n    print(f'line {i:07d} ' + 'x' * 180, flush=True)\n    time.sleep(0.002)\n"  # fmt: skip


def test_a_log_past_its_limit_is_rotated_while_its_writer_goes_on(tmp_path: Path):
    procs = WorkerProcesses()
    procs.logs = [tmp_path / "worker-0.log"]
    procs.log_max_bytes = 8192
    procs._start = [([sys.executable, "-c", WRITER], {})]
    procs.procs = [procs._popen(0)]
    try:
        rotated = 0
        deadline = time.monotonic() + 20
        while rotated < 3:
            assert time.monotonic() < deadline, "the writer did not fill its log"
            if procs.logs[0].stat().st_size > procs.log_max_bytes:
                procs.rotate_logs()
                rotated += 1
            time.sleep(0.05)
        time.sleep(0.2)  # the writer goes on after the last truncation
        assert procs.alive(0)
    finally:
        procs.kill()
        procs.procs[0].wait()
    log, old = procs.logs[0].read_bytes(), (tmp_path / "worker-0.log.1").read_bytes()
    assert b"\0" not in log and b"\0" not in old  # appends: no hole where the file was emptied
    assert len(old) > procs.log_max_bytes and log.startswith(b"line ")
    first, last = int(log.split()[1]), int(old.split(b"\n")[-2].split()[1])
    assert first > last  # what the log holds now came after what was rotated out


def test_workers_log_into_the_given_directory_which_stays(tmp_path: Path, tiny_model_dirs):
    where = tmp_path / "logs"
    with LLM(
        str(tiny_model_dirs["llama"]),
        mode="afd",
        transport="shm",
        attention_workers=1,
        worker_log_dir=str(where),
        worker_log_max_bytes=4096,
    ) as llm:
        out = llm.generate([[5, 9, 200]], SamplingParams(temperature=0, max_tokens=3))
        assert len(out[0].token_ids) == 3
        logs = sorted(p.name for p in where.iterdir())
        assert logs == ["worker-0.log", "worker-1.log"]
        assert llm.engine.worker_log(1) == where / "worker-1.log"
    assert where.is_dir()  # the operator's directory is never removed


@pytest.mark.parametrize("field, value", [("worker_log_dir", ""), ("worker_log_max_bytes", 100)])
def test_bad_log_settings_are_refused(field, value):
    with pytest.raises(UserInputError, match=field):
        EngineConfig(**{field: value})
