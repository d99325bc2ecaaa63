"""Hardware catalog: peak numbers of one accelerator, with where each figure comes from.

Units: FLOP/s (dense, i.e. without structured sparsity), bytes, bytes/s. Link bandwidths are PER
DIRECTION per device: vendors quote NVLink as the bidirectional total (H100: 900 GB/s), which is
450 GB/s each way; a 400 Gb/s NIC is 50 GB/s each way. Prices are $ per device-hour and are
given only where a figure is published with a source; otherwise None (pass a price on the
command line). Entries marked `approximate` rest on figures that vary between public reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from afdserve.errors import UserInputError

GB = 1e9
TB = 1e12
GiB = 2**30  # HBM capacities: a "80GB" H100 holds 80 GiB, as the device reports
MiB = 2**20
TFLOPS = 1e12


@dataclass(frozen=True)
class Hardware:
    """One accelerator's peak capabilities."""

    name: str
    description: str
    bf16_flops: float
    """Dense BF16 tensor FLOP/s."""
    fp8_flops: float | None
    """Dense FP8 tensor FLOP/s; None where the device has no FP8 tensor path."""
    memory_bytes: float
    memory_bw: float
    """Device memory bandwidth, bytes/s."""
    scale_up_bw: float | None
    """Per direction, bytes/s, within a node (NVLink / Infinity Fabric / HCCS / PCIe)."""
    scale_out_bw: float | None
    """Per direction, bytes/s, per device across nodes (its NIC share); None if not fixed."""
    price_per_hour: float | None
    """$ per device-hour where one is published (see source), else None."""
    source: str
    approximate: bool = False
    scale_up_domain: int | None = None
    """Devices one scale-up fabric joins (an HGX board: 8; a GB200 NVL72 rack: 72), so that a
    deployment knows which of its transfers can use `scale_up_bw` (`link_for`); None: unknown."""

    def __post_init__(self) -> None:
        for name in ("bf16_flops", "memory_bytes", "memory_bw"):
            if not getattr(self, name) > 0:
                raise UserInputError(f"hardware {self.name}: {name} must be > 0")

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for weights of `dtype`: FP8 tensor cores for fp8 where present, else BF16."""
        if dtype == "fp8" and self.fp8_flops is not None:
            return self.fp8_flops
        return self.bf16_flops

    def link_for(self, devices: int) -> str:
        """'scale-up' when `devices` fit in one scale-up domain, else 'scale-out': the link an
        A<->F transfer of a deployment spanning that many devices crosses (its busiest hop)."""
        if self.scale_up_domain is not None and devices <= self.scale_up_domain:
            return "scale-up"
        return "scale-out"

    def link_bw(self, link: str) -> float | None:
        if link == "scale-up":
            return self.scale_up_bw
        if link == "scale-out":
            return self.scale_out_bw
        raise UserInputError(f"link must be 'scale-up' or 'scale-out', got {link!r}")


def hardware_catalog() -> dict[str, Hardware]:
    """Catalog entries by lower-case name (built per call: no module-level mutable state)."""
    nic400 = 400e9 / 8  # a 400 Gb/s NIC per GPU, bytes/s each way
    entries = (
        Hardware(
            name="h100",
            description="NVIDIA H100 SXM5 80GB",
            bf16_flops=989 * TFLOPS,
            fp8_flops=1979 * TFLOPS,
            memory_bytes=80 * GiB,
            memory_bw=3.35 * TB,
            scale_up_bw=450 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "NVIDIA H100 Tensor Core GPU datasheet (SXM5; the datasheet's 1979/3958 TFLOPS "
                "are with sparsity); NVLink 4 900 GB/s total; DGX H100: one 400 Gb/s "
                "ConnectX-7 per GPU; memory 80 GiB (aiconfigurator 0.12.0 systems/h100_sxm.yaml: "
                "85,899,345,920 bytes)"
            ),
            scale_up_domain=8,
        ),
        Hardware(
            name="h200",
            description="NVIDIA H200 SXM 141GB",
            bf16_flops=989 * TFLOPS,
            fp8_flops=1979 * TFLOPS,
            memory_bytes=141 * GiB,
            memory_bw=4.8 * TB,
            scale_up_bw=450 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "NVIDIA H200 Tensor Core GPU datasheet (SXM; sparse figures halved); NVLink "
                "900 GB/s total; 400 Gb/s NIC per GPU as in HGX H200 reference designs; memory "
                "141 GiB (aiconfigurator 0.12.0 systems/h200_sxm.yaml: 151,397,597,184 bytes)"
            ),
            scale_up_domain=8,
        ),
        Hardware(
            name="h800",
            description="NVIDIA H800 SXM5 80GB (export variant of H100, NVLink cut to 400 GB/s)",
            bf16_flops=989 * TFLOPS,
            fp8_flops=1979 * TFLOPS,
            memory_bytes=80 * GiB,
            memory_bw=3.35 * TB,
            scale_up_bw=200 * GB,
            scale_out_bw=nic400,
            price_per_hour=2.0,
            source=(
                "compute and memory as H100 SXM5 (as used in Step-3, arXiv 2507.19427: "
                "9.89e14 FLOP/s bf16, 3.35e12 B/s, and its $2/h price assumption); NVLink "
                "400 GB/s total; 400 Gb/s InfiniBand per GPU as in DeepSeek-V3's cluster "
                "(arXiv 2412.19437); memory 80 GiB, the H100's HBM3"
            ),
            approximate=True,
            scale_up_domain=8,
        ),
        Hardware(
            name="h20",
            description="NVIDIA H20 96GB (export variant)",
            bf16_flops=148 * TFLOPS,
            fp8_flops=296 * TFLOPS,
            memory_bytes=96 * GB,
            memory_bw=4.0 * TB,
            scale_up_bw=450 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "widely reported partner spec-sheet figures (148 TFLOPS bf16, 296 fp8, 96 GB "
                "HBM3 at 4.0 TB/s, NVLink 900 GB/s); no public NVIDIA datasheet; NIC assumed "
                "400 Gb/s per GPU"
            ),
            approximate=True,
        ),
        Hardware(
            name="a100",
            description="NVIDIA A100 SXM4 80GB",
            bf16_flops=312 * TFLOPS,
            fp8_flops=None,
            memory_bytes=80 * GiB,
            memory_bw=2.039 * TB,
            scale_up_bw=300 * GB,
            scale_out_bw=200e9 / 8,
            price_per_hour=None,
            source=(
                "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM; 624 TFLOPS bf16 is with "
                "sparsity; no FP8); NVLink 3 600 GB/s total; DGX A100: one 200 Gb/s HDR NIC per GPU; "
                "memory 80 GiB (aiconfigurator 0.12.0 systems/a100_sxm.yaml: 85,899,345,920 bytes)"
            ),
            scale_up_domain=8,
        ),
        Hardware(
            name="b200",
            description="NVIDIA B200 (HGX B200) 180GB",
            bf16_flops=2250 * TFLOPS,
            fp8_flops=4500 * TFLOPS,
            memory_bytes=180 * GiB,
            memory_bw=8.0 * TB,
            scale_up_bw=900 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "NVIDIA HGX B200 / DGX B200 specifications (sparse figures halved; 1,440 GB and "
                "64 TB/s per 8 GPUs; later sheets quote 7.7 TB/s per GPU); NVLink 5 1.8 TB/s total; "
                "DGX B200: 400 Gb/s ConnectX-7 per GPU; memory 180 GiB (aiconfigurator 0.12.0 "
                "systems/b200_sxm.yaml: 193,273,528,320 bytes)"
            ),
            approximate=True,
            scale_up_domain=8,
        ),
        Hardware(
            name="mi300x",
            description="AMD Instinct MI300X 192GB",
            bf16_flops=1307.4 * TFLOPS,
            fp8_flops=2614.9 * TFLOPS,
            memory_bytes=192 * GB,
            memory_bw=5.3 * TB,
            scale_up_bw=448 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "AMD Instinct MI300X datasheet (dense figures); Infinity Fabric 896 GB/s peak "
                "aggregate; NIC assumed 400 Gb/s per GPU as in typical 8-GPU platforms"
            ),
        ),
        Hardware(
            name="l40s",
            description="NVIDIA L40S 48GB (PCIe, no NVLink)",
            bf16_flops=362.05 * TFLOPS,
            fp8_flops=733 * TFLOPS,
            memory_bytes=48 * GB,
            memory_bw=864 * GB,
            scale_up_bw=32 * GB,
            scale_out_bw=None,
            price_per_hour=None,
            source=(
                "NVIDIA L40S datasheet (sparse figures halved); GDDR6 864 GB/s; only PCIe Gen4 "
                "x16 (~32 GB/s each way, approximate); scale-out depends on the server's NIC"
            ),
        ),
        Hardware(
            name="ascend-910b",
            description="Huawei Ascend 910B 64GB",
            bf16_flops=320 * TFLOPS,
            fp8_flops=None,
            memory_bytes=64 * GB,
            memory_bw=1.6 * TB,
            scale_up_bw=196 * GB,
            scale_out_bw=200e9 / 8,
            price_per_hour=None,
            source=(
                "no public datasheet; press and vendor-partner reports put FP16 at about 280-376 "
                "TFLOPS depending on bin (we take ~320), 64 GB HBM2e at about 1.6 TB/s, HCCS "
                "~392 GB/s total per NPU in Atlas 800T A2, 200 GbE RoCE per NPU; no FP8"
            ),
            approximate=True,
        ),
        Hardware(
            name="gb200",
            description="NVIDIA GB200 NVL72: one Blackwell GPU of a 72-GPU NVLink rack (18 "
            "compute trays of 4 GPUs)",
            bf16_flops=2500 * TFLOPS,
            fp8_flops=5000 * TFLOPS,
            memory_bytes=189471 * MiB,
            memory_bw=8.0 * TB,
            scale_up_bw=900 * GB,
            scale_out_bw=nic400,
            price_per_hour=None,
            source=(
                "NVIDIA GB200 NVL72 specifications, per rack of 72 GPUs: FP8 720 PFLOPS and "
                "FP16/BF16 360 PFLOPS with sparsity (dense: half, i.e. 5 and 2.5 PFLOPS per GPU), "
                "13.4 TB HBM3e at 576 TB/s (186 GB, 8 TB/s per GPU), fifth-generation NVLink "
                "130 TB/s (1.8 TB/s per GPU, 900 GB/s each way) joining all 72 GPUs through "
                "NVLink switch trays, so a compute tray (4 GPUs) and the rack share one scale-up "
                "bandwidth; one 400 Gb/s ConnectX-7 per GPU for scale-out; memory 189,471 MiB as "
                "nvidia-smi reports it (aiconfigurator 0.12.0 systems/gb200.yaml)"
            ),
            approximate=True,
            scale_up_domain=72,
        ),
    )
    return {e.name: e for e in entries}


_ALIASES: Mapping[str, str] = {
    "gb200-nvl72": "gb200",
    "h100-sxm": "h100",
    "h100-sxm5": "h100",
    "h200-sxm": "h200",
    "a100-80gb": "a100",
    "a100-sxm": "a100",
    "mi300": "mi300x",
    "910b": "ascend-910b",
    "ascend910b": "ascend-910b",
}


def load_hardware(name: str) -> Hardware:
    """A catalog entry by (case-insensitive) name; unknown names raise UserInputError."""
    catalog = hardware_catalog()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in catalog:
        raise UserInputError(f"unknown hardware {name!r}; known: {', '.join(catalog)}")
    return catalog[key]
