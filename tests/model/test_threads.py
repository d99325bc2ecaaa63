"""Compute threads run with the creating thread's torch thread count (model/threads.py).

Checked in a fresh process with OMP_NUM_THREADS=2, where a thread that never adopted torch's
count makes oneDNN run its GEMMs on two threads: every GEMM of the in-process AFD engine (two
attention workers on a pool, an FFN thread) must see the one thread the engine was built with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, pathlib, sys, threading
    import torch
    torch.set_num_threads(1)
    lib = pathlib.Path(torch.__file__).parent / "lib"
    omp = next((ctypes.CDLL(str(p)) for p in sorted(lib.glob("lib*omp*.so*"))), None)
    if omp is None:
        print(json.dumps({"skip": "no OpenMP runtime in torch/lib"}))
        sys.exit(0)
    from afdserve import LLM, SamplingParams
    from afdserve.model import kernels
    from afdserve.model.threads import ThreadCount
    seen = {}
    call = kernels.PreparedWeight.__call__
    def spy(self, x, bias):
        seen.setdefault(threading.current_thread().name, set()).add(omp.omp_get_max_threads())
        return call(self, x, bias)
    kernels.PreparedWeight.__call__ = spy
    bare = []
    t = threading.Thread(target=lambda: bare.append(omp.omp_get_max_threads()))
    t.start(); t.join()
    applied = []
    tc = ThreadCount.capture()
    t = threading.Thread(target=lambda: (tc.apply(), applied.append(omp.omp_get_max_threads())))
    t.start(); t.join()
    with LLM(sys.argv[1], mode="afd", attention_workers=2, microbatches=2, batch_invariant=True,
             transport="local") as llm:
        llm.generate([[5, 9, 200], [7] * 21], SamplingParams(temperature=0, max_tokens=4))
    print(json.dumps({"bare": bare, "applied": applied,
                      "seen": {k: sorted(v) for k, v in seen.items()}}))
    """
)


def test_every_compute_thread_runs_with_the_engines_thread_count(tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir("qwen3-moe"))],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        import pytest

        pytest.skip(got["skip"])
    assert got["bare"] == [2]  # the hazard is real here: a new thread's default team
    assert got["applied"] == [1]
    threads = got["seen"]
    assert any(name.startswith("afd-ffn") for name in threads), threads
    assert sum(name.startswith("afd_") for name in threads) >= 1, threads
    assert all(counts == [1] for counts in threads.values()), threads
