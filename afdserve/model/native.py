"""afdserve's one native kernel (csrc/paged_attention.c), built on first use and called by ctypes.

Why C and ctypes rather than a torch extension: the kernel needs no torch API, so it builds in
about a second with the system C compiler (a torch extension takes a minute and needs ninja),
and it reads tensors through their data pointers. It links OpenMP by soname (libgomp.so.1), so
it shares the OpenMP runtime torch has already loaded instead of starting a second thread pool.

The library is cached in the built-in models' directory (model/builtin.py), under kernels/,
keyed by the source, the flags and the compiler's version; it is written to a temporary file
and renamed into place, so concurrent worker processes never load a half-written library.
Where no compiler is found or the build fails, `paged_attention_kernel()` returns None and the
attention falls back to torch ops (model/attention.py), with one warning.

Build flags that keep the arithmetic the same on every CPU: -ffp-contract=off (no fused
multiply-add but the kernel's explicit, correctly rounded fmaf), no -ffast-math (no
reassociation, no vector libm). -march=native lets the compiler use the host's vector width and
FMA instructions; with those two flags that changes speed only, never results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from afdserve.model.builtin import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.c"
FLAGS = (
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-std=gnu11",
)
LIBS = ("-lm",)
BUILD_TIMEOUT_S = 120.0
MAX_HEAD_DIM = 512
"""The kernel's MAX_DH."""
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""Element types the kernel reads and writes, as its `kind` argument (and as its `kv_kind`
for a full-precision cache; a quantised cache's kv_kind is in model/kv_quant.py: 3 int8, 4 fp8
e4m3, each with a float32 scale per token and KV head)."""

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: list[str] = []


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode())
    target = cache_dir() / "kernels" / f"paged_attention-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(SOURCE), *LIBS],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-2000:] or f"{cc} exited {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def paged_attention_kernel() -> ctypes.CDLL | None:
    """The loaded library (built on first use), or None where it cannot be built here."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        lib = None
        if os.environ.get("AFDSERVE_NATIVE", "1") != "0":
            cc = _compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler (cc, gcc, clang) on PATH")
                lib = ctypes.CDLL(str(_build(cc)))
                fn = lib.afd_paged_attention
                fn.restype = ctypes.c_int
                fn.argtypes = [
                    *(ctypes.c_void_p,) * 3,  # q, k_cache, v_cache
                    ctypes.c_void_p,  # block_tables
                    ctypes.c_int64,  # max_blocks
                    *(ctypes.c_void_p,) * 3,  # row0, qlen, start
                    *(ctypes.c_int64,) * 6,  # S, H, Hkv, Dh, NB, BS
                    ctypes.c_float,  # scale
                    ctypes.c_void_p,  # out
                    ctypes.c_int,  # kind
                    ctypes.c_int,  # nthreads
                    ctypes.c_int,  # kv_kind
                    ctypes.c_void_p,  # k_scale (NULL unless quantised)
                    ctypes.c_void_p,  # v_scale
                ]
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                log.warning("native paged attention unavailable, using torch ops (%s)", exc)
                _errors.append(str(exc))
                lib = None
        _loaded["lib"] = lib
        return lib


def build_error() -> str:
    """Why the kernel is unavailable ('' if it is available or was not tried)."""
    return (
        _errors[-1]
        if _errors
        else (
            "disabled by AFDSERVE_NATIVE=0" if os.environ.get("AFDSERVE_NATIVE", "1") == "0" else ""
        )
    )
