"""Which kernels a model runs, chosen once per engine: exact (batch-invariant) or fast.

AFD gives exactly the aggregated tokens only if a token's result does not depend on how many
other tokens share its batch: an attention worker's batch, a microbatch and the FFN's gathered
batch all hold different rows than the aggregated engine's batch. BLAS libraries break that:
they pick a GEMM kernel (register tile, K blocking, a small-M path, AMX or AVX-512 or AVX2) by
the matrix shape, and different kernels round differently. Measured: on AMD EPYC (AVX2) fp32
rows differ for M = 1..3 against larger M; on an Intel Xeon with AVX-512/AMX rows differ once
12 or more rows share the GEMM; on an H100 cuBLAS rows differ between M = 4 and M = 12..2048.

`Kernels(batch_invariant=True)` (the exact mode, `--batch-invariant`) removes the dependence by
construction: every GEMM the model runs, on every device, has one fixed row count.
- `tiled_linear` multiplies exactly `row_tile(device)` rows at a time (16 on a CPU, 128 on a
  GPU), zero-padding the last tile, from a 64-byte-aligned buffer (MKL's kernel choice may also
  depend on alignment). A fixed (M, K, N) and thread count means the library runs one fixed
  kernel sequence; each row's arithmetic is then the same wherever that row sits, since no BLAS
  computes a row differently by the values of other rows. Which CPU it runs on does not matter:
  the shape never changes, whatever the kernel the library picks for that shape.
- Attention pads each sequence to a shape that depends only on itself (model/attention.py).
- Reductions across rows do not exist in the model; each row's own reductions (RMSNorm, softmax,
  the MoE's sum over its k experts) run in a fixed order.
`tests/model/test_batch_invariance.py` checks this on model-sized shapes with hypothesis.

The fast mode (default) runs each GEMM as one call at its natural size, and attention over one
padded group per phase instead of one per shape bucket: results then depend on batch
composition in the last bits, so AFD agrees with aggregated within a tolerance (its tests
compare log-probabilities, docs/architecture.md), as vLLM's default mode does.

Weights are prepared once, after loading (`Kernels.prepare`): on a CPU with oneDNN (which
torch bundles, and vLLM's CPU build uses), each is reordered into oneDNN's blocked layout, the
form its GEMM reads fastest (measured on AMD EPYC, fp32, 2 threads: 80-118 GFLOP/s against
MKL's 33-78 on the same shapes; benchmarks/bench_kernels.py). Where the CPU has no native
bfloat16/float16 GEMM (AVX2 without AVX512-BF16 or AMX), half-precision weights are prepared in
float32 and the GEMM runs there, rounding its output to the activation dtype: the same
products and float32 accumulation a native half-precision GEMM performs, several times faster
than torch's generic fallback. The plain weight is then dropped, so weights take no more memory
than a float32 checkpoint.

Legend: M = rows (tokens), K = input features, N = output features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CPU_ROW_TILE = 16
"""Rows per GEMM on a CPU in the exact mode: large enough for an efficient kernel, small enough
that padding a decode batch costs little."""
GPU_ROW_TILE = 128
"""Rows per GEMM on a GPU in the exact mode (cuBLAS's kernels are efficient from there)."""
ALIGN = 64
"""Bytes: tiles start on a cache line, as freshly allocated tensors do."""


def row_tile(device: torch.device) -> int:
    return GPU_ROW_TILE if device.type == "cuda" else CPU_ROW_TILE


@dataclass(frozen=True)
class PreparedWeight:
    """A weight [N, K] in the form its GEMM runs from."""

    weight: torch.Tensor
    """Plain [N, K], or oneDNN's packed form of it when `packed`."""
    packed: bool
    compute_dtype: torch.dtype
    """What the GEMM computes in; inputs are cast to it, outputs cast back."""

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One GEMM: x [M, K] -> [M, N] in x's dtype."""
        dtype = x.dtype
        if dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
            bias = None if bias is None else bias.to(self.compute_dtype)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, bias)
        return y if y.dtype == dtype else y.to(dtype)


def _native_half(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a native GEMM for `dtype` on this CPU."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def _onednn_usable() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        )
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(w: torch.Tensor) -> torch.dtype:
    """What GEMMs on weight `w` compute in: its dtype, except half precision on a CPU without
    a native GEMM for it (float32 there, see the module docstring)."""
    if w.device.type != "cpu" or _native_half(w.dtype):
        return w.dtype
    return torch.float32


def prepare_weight(w: torch.Tensor) -> PreparedWeight:
    """The fastest form of weight `w` [N, K] on its device (see the module docstring)."""
    if w.device.type != "cpu":
        return PreparedWeight(w, False, w.dtype)
    compute = compute_dtype(w)
    plain = w.to(compute).contiguous()
    if not _onednn_usable():
        return PreparedWeight(plain, False, compute)
    try:
        packed = PreparedWeight(torch.ops.mkldnn._reorder_linear_weight(plain, None), True, compute)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
        want = F.linear(probe.to(compute), plain).float()
        if not torch.allclose(packed(probe.to(compute), None).float(), want, rtol=1e-2, atol=1e-2):
            raise RuntimeError("packed GEMM disagrees with F.linear")
        return packed
    except RuntimeError as exc:  # an op this torch build lacks, or a wrong result
        log.warning("oneDNN weight packing unavailable, using F.linear (%s)", exc)
        return PreparedWeight(plain, False, compute)


def tiled_linear(
    x: torch.Tensor,  # [M, K]
    weight: PreparedWeight,  # [N, K]
    bias: torch.Tensor | None,
    tile: int,
) -> torch.Tensor:  # [M, N]
    """The GEMM computed `tile` rows at a time, every call of one shape [tile, K] x [K, N]."""
    m, k = x.shape
    rows = m + (-m % tile)
    if rows != m or not x.is_contiguous() or x.data_ptr() % ALIGN:
        xp = x.new_zeros(rows, k)  # [rows, K], fresh, hence aligned
        xp[:m] = x
    else:
        xp = x
    tiles = xp.split(tile)  # views [tile, K] at offsets of tile * K elements
    if (tile * k * x.element_size()) % ALIGN:  # offsets off the cache line: copy each tile
        tiles = [t.clone() for t in tiles]
    if len(tiles) == 1:
        out = weight(tiles[0], bias)
    else:
        out = torch.cat([weight(t, bias) for t in tiles])  # [rows, N]
    return out[:m] if rows != m else out


@dataclass(frozen=True)
class Kernels:
    """The kernel choice of one engine, passed to the model parts when they are built."""

    batch_invariant: bool = False
    """True: every row's result is independent of what shares its batch, bit for bit (AFD equals
    aggregated exactly); False: the fastest kernels, equal within rounding."""

    def prepare(self, w: torch.Tensor) -> PreparedWeight:
        return prepare_weight(w)

    def linear(
        self, x: torch.Tensor, weight: PreparedWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:  # [M, K] -> [M, N]
        if self.batch_invariant:
            return tiled_linear(x, weight, bias, row_tile(x.device))
        return weight(x, bias)
