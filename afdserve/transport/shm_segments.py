"""The shm transport's ring files in /dev/shm: how they are named, and the sweep of those whose
creator died before it could unlink them.

A ring file is `afdserve-<session>-<src>to<dst>-<pid>`: the pid of its creator (the sender `src`)
tells a later endpoint on the host whether the file can still be in use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "afdserve-"
SEGMENT_RE = re.compile(rf"^{SEGMENT_PREFIX}.+-\d+to\d+-(\d+)$")


def ring_name_prefix(session: str, src: int, dst: int) -> str:
    """The name of the ring `src` writes to `dst`, up to its creator's pid."""
    return f"{SEGMENT_PREFIX}{session}-{src}to{dst}-"


def sweep_stale_segments(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink ring files whose creating process no longer exists; returns what was removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = SEGMENT_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            (directory / name).unlink()
            removed.append(directory / name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
