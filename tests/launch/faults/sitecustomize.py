"""Fault injection for worker processes, kept out of production code: a test puts this
directory on the workers' PYTHONPATH, so Python runs this file at start-up in every worker.

AFDSERVE_TEST_STALL="RANK:STEP:LAYER:SECONDS": attention worker RANK sleeps SECONDS before
sending its microbatch-0 activation of (STEP, LAYER), playing a slow worker that misses the
FFN's sync deadline. The worker builds its FFN link as `afdserve.afd.ffn_link.RemoteFFN` when it
starts its loop, after this file ran, so replacing that class here is enough.
"""

from __future__ import annotations

import logging
import os
import time

_SPEC = os.environ.get("AFDSERVE_TEST_STALL", "").split(":")

if len(_SPEC) == 4:
    from afdserve.afd import ffn_link

    _rank, _step, _layer = (int(v) for v in _SPEC[:3])
    _seconds = float(_SPEC[3])

    class _StallingRemoteFFN(ffn_link.RemoteFFN):
        def submit(self, step, layer, microbatch, h) -> None:
            if (self.transport.rank, step, layer, microbatch) == (_rank, _step, _layer, 0):
                logging.getLogger("afdserve.test").warning(
                    "AFDSERVE_TEST_STALL: sleeping %.1fs at step %d layer %d", _seconds, step, layer
                )
                time.sleep(_seconds)
            super().submit(step, layer, microbatch, h)

    ffn_link.RemoteFFN = _StallingRemoteFFN  # type: ignore[misc]
