"""Expert parallelism in the cost model: how many FFN devices one token is sent to, and what an
uneven expert load costs.

- **Fan-out.** A token's k experts are k distinct experts of E; with the experts of a layer
  spread over m devices in blocks of n_d, the expected number of distinct devices it reaches
  is sum_d P(at least one of its k on device d) = sum_d [1 - C(E - n_d, k) / C(E, k)] (uniform
  routing, drawn without replacement). DeepSeek-V3 (E = 256, k = 8) over 8 devices: 5.30, not
  8. The dispatch carries one hidden state per (token, device) pair; the runtime's combine
  returns one row per (token, slot) pair instead (afd/expert_dispatch.py: exactness), which
  costs k / fan-out more on the way back.
- **Imbalance.** Under EP the busiest FFN device sets a layer's pace: with max/mean expert
  load `imbalance` over the devices, the per-token compute term alpha_F grows by that factor.
  The weight-streaming term beta_F does not: each device streams its own slots' weights
  whatever their load, but redundant slots (EPLB's replicas) add (E + R) / E to it and to the
  FFN's weight memory. The runtime measures the factor (`afdserve:ffn_expert_imbalance`, per
  layer: pass the worst, or a mean over layers) before and after EPLB.
"""

from __future__ import annotations

import math

from afdserve.errors import UserInputError


def expected_fanout(num_experts: int, top_k: int, num_devices: int) -> float:
    """Expected distinct devices a token's top-k experts land on (uniform routing, experts in
    contiguous blocks of E/m, sizes differing by at most one when m does not divide E)."""
    e, k, m = num_experts, top_k, num_devices
    if not (isinstance(e, int) and isinstance(k, int) and isinstance(m, int)) or not (
        e >= 1 and 1 <= k <= e and m >= 1
    ):
        raise UserInputError(
            f"need experts >= 1, 1 <= top_k <= experts, devices >= 1; got {e}, {k}, {m}"
        )
    total = math.comb(e, k)
    sizes = [(d + 1) * e // m - d * e // m for d in range(m)]
    return sum(1 - math.comb(e - n, k) / total for n in sizes)


def check_ep(imbalance: float, redundant_experts: int) -> None:
    """UserInputError unless `imbalance` >= 1 and `redundant_experts` >= 0."""
    if (
        isinstance(imbalance, bool)
        or not isinstance(imbalance, (int, float))
        or not (math.isfinite(imbalance) and imbalance >= 1)
    ):
        raise UserInputError(f"expert imbalance (max/mean load) must be >= 1, got {imbalance!r}")
    if (
        isinstance(redundant_experts, bool)
        or not isinstance(redundant_experts, int)
        or redundant_experts < 0
    ):
        raise UserInputError(
            f"redundant experts must be an integer >= 0, got {redundant_experts!r}"
        )
