"""WorkerProcesses: the worker processes a front spawned on this host, and their supervision.

A front that spawns its workers (no `EngineConfig.front`) starts each as `afdserve worker
--rank K --control ADDR --events ADDR`, with its output in a log file, and must never leave one
behind: `stop` asks nothing (the front has sent its shutdown message already), waits, then
SIGTERMs, then SIGKILLs. A worker that exits early is reported with the tail of its log. Logs
go to `EngineConfig.worker_log_dir` (or a temporary directory, removed when every worker exited
cleanly, kept and named in errors otherwise); one past `worker_log_max_bytes` is rotated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from afdserve.config import EngineConfig


class WorkerProcesses:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen | None] = []
        """By rank; None for a slot with no process (an attention slot of
        `max_attention_workers` not filled yet, or whose worker was removed)."""
        self.logs: list[Path] = []
        self.logdir = ""
        self._own_logdir = False
        """Whether `logdir` is this group's temporary directory (removed after a clean stop),
        not the operator's `worker_log_dir`."""
        self.log_max_bytes = 0
        self._start: list[tuple[list[str], dict[str, str]]] = []
        """Each rank's command line and environment, to start it again (`respawn`)."""

    def spawn(
        self, cfg: EngineConfig, events: str, controls: list[str], ranks: set[int] | None = None
    ) -> None:
        """Start rank k (0..R_MAX+m-1, those in `ranks`; all by default) told `controls[k]` and
        `events`, pinned to core k mod cores when `cfg.pin_workers`; the rest of its
        configuration comes from the front. The others can be started later (`start`)."""
        if cfg.worker_log_dir:
            os.makedirs(cfg.worker_log_dir, exist_ok=True)
            self.logdir = cfg.worker_log_dir
        else:
            self.logdir, self._own_logdir = tempfile.mkdtemp(prefix="afdserve-workers-"), True
        self.log_max_bytes = cfg.worker_log_max_bytes
        ncpu = os.cpu_count() or 1
        env = _worker_env(cfg, ncpu)
        for rank, ctrl in enumerate(controls):
            args = [sys.executable, "-m", "afdserve.cli", "worker"]
            args += ["--rank", str(rank), "--control", ctrl, "--events", events]
            if cfg.pin_workers:
                args += ["--cpus", str(rank % ncpu)]
            self.logs.append(Path(self.logdir) / f"worker-{rank}.log")
            self._start.append((args, env))
            self.procs.append(self._popen(rank) if ranks is None or rank in ranks else None)

    def _popen(self, rank: int) -> subprocess.Popen:
        """Start rank `rank` writing to its log in append mode: every write lands at the end,
        so `rotate_logs` can empty the file under a running worker."""
        args, env = self._start[rank]
        with open(self.logs[rank], "ab") as logf:
            return subprocess.Popen(
                args,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # a terminal's Ctrl-C reaches the front only, which then shuts the
                # workers down in order (they die with it anyway: PR_SET_PDEATHSIG)
                start_new_session=True,
            )

    def respawn(self, rank: int) -> None:
        """Start rank `rank` again, as it was first started, after it exited (its log goes on
        in the same file); or for the first time, in an empty slot (`start`)."""
        p = self.procs[rank]
        if p is not None and p.poll() is None:
            raise RuntimeError(f"worker rank {rank} is still running")
        self.procs[rank] = self._popen(rank)

    start = respawn

    def detach(self, rank: int) -> subprocess.Popen | None:
        """Empty slot `rank` (a worker removed at run time, or one that failed to join): its
        process, no longer supervised here (the caller `reap`s it)."""
        p, self.procs[rank] = self.procs[rank], None
        return p

    def _running(self) -> list[tuple[int, subprocess.Popen]]:
        return [(rank, p) for rank, p in enumerate(self.procs) if p is not None]

    def rotate_logs(self) -> None:
        """Every log past `log_max_bytes` is copied to `.1` (replacing the one before) and
        emptied in place, as logrotate's copytruncate does: the worker keeps its open file. A
        line written between the copy and the truncation is lost, a risk taken for a worker
        that never needs to reopen anything."""
        for log in self.logs:
            try:
                if log.stat().st_size <= self.log_max_bytes:
                    continue
                shutil.copyfile(log, log.with_name(log.name + ".1"))
                os.truncate(log, 0)
            except OSError:
                continue  # removed by hand, a full disk: the next round tries again

    def first_exit(self, starting: bool = False) -> str | None:
        """Why the first worker that exited is gone (with its log's tail), or None."""
        for rank, p in self._running():
            code = p.poll()
            if code is not None:
                what = "failed to start" if starting else "died"
                return f"worker rank {rank} {what} (exit code {code}): {_tail(self.logs[rank])}"
        return None

    def exits(self) -> list[tuple[int, str]]:
        """(rank, why it is gone, with its log's tail) of every worker that exited."""
        return [
            (rank, f"worker rank {rank} died (exit code {p.returncode}): {_tail(self.logs[rank])}")
            for rank, p in self._running()
            if p.poll() is not None
        ]

    def alive(self, rank: int) -> bool:
        p = self.procs[rank] if rank < len(self.procs) else None
        return p is not None and p.poll() is None

    def all_alive(self) -> bool:
        return all(p.poll() is None for _, p in self._running())

    def stop(self, timeout_s: float) -> None:
        """Wait up to half of `timeout_s` for every worker to exit, SIGTERM those left, wait the
        other half, SIGKILL the rest; then remove the logs if every exit was clean."""
        for signal_them in (subprocess.Popen.terminate, subprocess.Popen.kill):
            deadline = time.monotonic() + timeout_s / 2
            for _, p in self._running():
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    signal_them(p)
        for _, p in self._running():
            p.wait()
        if self._own_logdir and all(p.returncode == 0 for _, p in self._running()):
            shutil.rmtree(self.logdir, ignore_errors=True)

    def kill(self) -> None:
        for _, p in self._running():
            p.kill()

    def kill_rank(self, rank: int) -> None:
        """SIGKILL one worker (one declared wedged: its exit is then handled as a death)."""
        if self.alive(rank):
            self.procs[rank].kill()

    @property
    def exit_codes(self) -> list[int | None]:
        """By rank (0 for an empty slot: nothing runs there)."""
        return [0 if p is None else p.returncode for p in self.procs]

    @property
    def pids(self) -> list[int]:
        """By rank (0 for an empty slot)."""
        return [0 if p is None else p.pid for p in self.procs]


def reap(p: subprocess.Popen, timeout_s: float) -> int | None:
    """Wait up to `timeout_s` for a worker told to shut down to exit, then SIGKILL it; its exit
    code (None: it had to be killed)."""
    try:
        return p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


def _worker_env(cfg: EngineConfig, ncpu: int) -> dict[str, str]:
    """The workers' environment: this one, plus OpenMP told to sleep rather than spin between
    parallel regions when the workers' threads outnumber the cores (a spinning thread of one
    worker would take the core another worker needs; measured on 2 cores, 2A1F with a 2-thread
    FFN: 6 tok/s spinning, 21 sleeping). An OMP_WAIT_POLICY already set is kept."""
    env = dict(os.environ)
    ffn = cfg.ffn_workers * (cfg.ffn_threads or cfg.worker_threads)
    threads = cfg.attention_workers * cfg.worker_threads + ffn
    if threads > ncpu:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _tail(path: Path, lines: int = 6) -> str:
    """The last error lines of a log (or its last lines), its rotated part included."""
    text: list[str] = []
    for part in (path.with_name(path.name + ".1"), path):
        try:
            text += part.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
    if not text and not path.exists():
        return "(no log)"
    errors = [ln for ln in text if "error" in ln.lower()]
    return " | ".join((errors or text)[-lines:]) or "(empty log)"
