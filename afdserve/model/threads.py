"""What a thread needs before it runs model compute beside others: torch's thread count and
math libraries that chose their code paths already.

Two per-process states that torch and its libraries set lazily, per calling thread, break the
exact mode's promise (one fixed computation per row, model/kernels.py) when model parts compute
on several threads of one process (the in-process AFD engine: attention workers on a thread pool,
each FFN worker on a thread of its own):

- **Thread count.** `torch.set_num_threads(n)` sets OpenMP's team size for the calling thread
  and records n; another thread adopts n only the first time it calls `at::get_num_threads`
  (`at::parallel_for` does; an elementwise op on fewer than 32,768 elements does not). Until
  then OpenMP gives it its default team (every core, or OMP_NUM_THREADS as read when torch
  loaded), and oneDNN, which asks OpenMP directly, runs its GEMMs on that many threads.
- **First calls into MKL's vector math.** torch computes cos, sin, exp, log and other
  elementwise functions of contiguous float tensors with MKL's VML, which picks its code path
  on a function's first call. Threads making their first call at once can take different paths
  for a while, and the paths round differently. Measured on an Intel Xeon with AVX-512/AMX:
  in 1 of 14 fresh processes, `emb.cos()` in RoPE gave another result than `emb.clone().cos()`
  in the same call on an attention worker's thread; the request's KV then differed, and its
  logprobs by up to 3e-4. Three threads each making a first `cos` at a barrier: 1 of 20
  processes.

Measured together, the in-process engine of tests/launch/test_placements_agree.py gave 3
distinct logprob digests in 6 fresh processes before; worker processes, whose compute runs on
their main thread alone, never did. So the thread that starts compute threads calls
`ThreadCount.capture()` (which makes every such first call itself, once per process), and each
compute thread starts with its `apply`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

_WARM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WARM_OPS = (
    "cos", "sin", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "tanh", "sigmoid",
    "erf", "erfc", "erfinv", "sqrt", "rsqrt", "reciprocal", "abs", "neg", "ceil", "floor",
    "round", "trunc", "frac", "acos", "asin", "atan", "cosh", "sinh", "lgamma", "digamma",
)  # fmt: skip
"""Elementwise functions torch may hand to MKL's VML (aten/src/ATen/cpu/vml.h), all of them,
not only the model's: a new model or sampler option must not bring the race back."""
_warm = threading.Lock()
_warmed = False


def warm_vector_math() -> None:
    """Make every first call into MKL's vector math from this thread, once per process: long
    enough (1,000 elements) for the vector path and not a multiple of a vector (the tail)."""
    global _warmed
    with _warm:
        if _warmed:
            return
        for dtype in _WARM_DTYPES:
            x = torch.linspace(0.1, 0.9, 1001, dtype=dtype)  # in every function's domain
            for op in _WARM_OPS:
                getattr(x, op)()
            torch.softmax(x, 0), torch.log_softmax(x, 0), torch.nn.functional.silu(x)
        _warmed = True


@dataclass(frozen=True)
class ThreadCount:
    """A torch thread count to apply in a new thread before it computes anything."""

    n: int

    @classmethod
    def capture(cls, n: int | None = None) -> ThreadCount:
        """`n`, or the creating thread's own count (read in the creating thread, which also
        warms the vector math here, before any compute thread exists)."""
        warm_vector_math()
        return cls(n if n is not None else torch.get_num_threads())

    def apply(self) -> None:
        """Run first in the new thread (a `ThreadPoolExecutor` initializer, a thread's target)."""
        torch.set_num_threads(self.n)
