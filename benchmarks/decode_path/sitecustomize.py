"""Loaded at start-up by every process of a `decode_path.py` run (it puts this directory on
PYTHONPATH): records which afdserve source files run code in each 100 ms of wall time, and
writes them to $AFDSERVE_DECODE_PATH_DIR/<pid>.json at exit."""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

_OUT = os.environ.get("AFDSERVE_DECODE_PATH_DIR")

if _OUT:
    _buckets: dict[int, set[str]] = {}

    def _profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call":
            name = frame.f_code.co_filename
            if "afdserve" in name and "decode_path" not in name:
                _buckets.setdefault(int(time.time() * 10), set()).add(name)

    def _dump() -> None:
        sys.setprofile(None)
        data = {str(b): sorted(files) for b, files in list(_buckets.items())}
        with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "buckets": data}, f)

    sys.setprofile(_profile)
    threading.setprofile(_profile)
    atexit.register(_dump)
