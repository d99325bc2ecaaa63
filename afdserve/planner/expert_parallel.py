"""Expert parallelism over m FFN devices: how many devices a token's top-k experts reach (the
dispatch fan-out), and the checks on the expert-imbalance factor and redundant expert slots the
roofline takes (docs/planner.md, section 3.3).

Placement: without replicas, device d holds the contiguous block of experts
[d*E//m, (d+1)*E//m) (the runtime's static placement, `afdserve.eplb.placement.Placement.static`),
so blocks differ by at most one expert when m does not divide E, and some devices hold none when
m > E. A token's k experts are taken uniformly without replacement from the E (uniform routing).

Legend: E = routed experts per MoE layer, k = experts per token (top-k), m = FFN devices,
R = redundant expert slots per MoE layer (replicas of hot experts, EPLB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from afdserve.errors import UserInputError


def _check_int(name: str, v: object, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UserInputError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def block_sizes(num_experts: int, num_devices: int) -> list[int]:
    """Experts on each device under the static placement: n_d = (d+1)*E//m - d*E//m."""
    e = _check_int("num_experts", num_experts, 1)
    m = _check_int("num_devices", num_devices, 1)
    return [(d + 1) * e // m - d * e // m for d in range(m)]


def expected_fanout(
    num_experts: int,
    top_k: int,
    num_devices: int,
    replicas: Sequence[Sequence[int]] | None = None,
) -> float:
    """Expected number of distinct devices a token's top-k experts land on.

    Without `replicas` (the static placement, block sizes n_d from `block_sizes`):

        E[fan-out] = sum_d P(some expert of the token is on d) = sum_d [1 - C(E - n_d, k) / C(E, k)]

    so it is 1 for m = 1 and k when every device holds at most one expert (m >= E); DeepSeek-V3
    (E = 256, k = 8) over m = 8 devices gives 8 * (1 - C(224, 8) / C(256, 8)) = 5.29, not 8.

    `replicas`: a placement with replicas instead, per device the expert ids it holds (each of
    the E experts somewhere, none twice on one device). An expert held by r_x devices sends each
    token's pair to one of them, each with probability 1/r_x (the runtime deals an expert's pairs
    round-robin over its replicas), independently across the token's experts. With
    q_{x,d} = 1/r_x if d holds x, else 0, P(d is missed) = e_k(1 - q_{., d}) / C(E, k), where e_k
    is the elementary symmetric polynomial of degree k over the E experts (the static placement
    is the case q in {0, 1}).
    """
    e = _check_int("num_experts", num_experts, 1)
    m = _check_int("num_devices", num_devices, 1)
    k = _check_int("top_k", top_k, 1)
    if k > e:
        raise UserInputError(f"top_k ({k}) cannot exceed num_experts ({e})")
    total = math.comb(e, k)
    if replicas is None:
        return float(sum(1 - math.comb(e - n, k) / total for n in block_sizes(e, m)))
    held = _check_placement(replicas, e, m)
    copies = [0] * e
    for ids in held:
        for x in ids:
            copies[x] += 1
    fanout = 0.0
    for ids in held:
        on_d = set(ids)
        miss = [1.0 - (1.0 / copies[x] if x in on_d else 0.0) for x in range(e)]
        fanout += 1.0 - _elementary_symmetric(miss, k) / total
    return fanout


def _elementary_symmetric(values: Sequence[float], k: int) -> float:
    """e_k(values): the sum over k-subsets of the product of their values (O(len * k))."""
    poly = [1.0] + [0.0] * k
    for v in values:
        for j in range(k, 0, -1):
            poly[j] += poly[j - 1] * v
    return poly[k]


def _check_placement(
    replicas: Sequence[Sequence[int]], num_experts: int, num_devices: int
) -> list[list[int]]:
    held = [list(ids) for ids in replicas]
    if len(held) != num_devices:
        raise UserInputError(f"replicas: {len(held)} device entries for {num_devices} FFN devices")
    seen = set()
    for d, ids in enumerate(held):
        if len(set(ids)) != len(ids):
            raise UserInputError(f"replicas: device {d} holds an expert twice: {ids}")
        for x in ids:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_experts:
                raise UserInputError(
                    f"replicas: device {d}: expert {x!r} not in 0..{num_experts - 1}"
                )
        seen.update(ids)
    missing = sorted(set(range(num_experts)) - seen)
    if missing:
        raise UserInputError(f"replicas: experts {missing[:8]} are held by no device")
    return held


def check_expert_imbalance(value: object) -> float:
    """`expert_imbalance` is max/mean routed load over the FFN devices: a finite number >= 1."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 1
    ):
        raise UserInputError(
            f"expert imbalance is max/mean load over the FFN devices, a number >= 1 "
            f"(1 = balanced), got {value!r}"
        )
    return float(value)


def check_redundant_experts(value: object) -> int:
    """`redundant_experts` (R, extra expert slots per MoE layer): an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserInputError(f"redundant experts must be an integer >= 0, got {value!r}")
    return value


def check_ep(imbalance: object, redundant_experts: object) -> None:
    """UserInputError unless `imbalance` >= 1 and `redundant_experts` is an integer >= 0."""
    check_expert_imbalance(imbalance)
    check_redundant_experts(redundant_experts)


def redundant_slots_fit(num_experts: int, num_devices: int, redundant: int) -> bool:
    """Whether E + R slots spread over m devices leave no device more slots than there are
    experts (a device holds an expert at most once): ceil((E + R) / m) <= E, i.e. E + R <= E*m."""
    return num_experts + redundant <= num_experts * num_devices


def check_redundant_slots(num_experts: int, num_devices: int, redundant: int) -> None:
    """UserInputError unless `redundant_slots_fit` (so R > 0 needs at least 2 devices)."""
    check_redundant_experts(redundant)
    if not redundant_slots_fit(num_experts, num_devices, redundant):
        slots = -(-(num_experts + redundant) // num_devices)
        raise UserInputError(
            f"{redundant} redundant experts: {num_experts} + {redundant} slots over "
            f"{num_devices} FFN device(s) put {slots} on one device, more than the "
            f"{num_experts} experts (a device holds each expert at most once); use at most "
            f"{num_experts * (num_devices - 1)} redundant experts or more FFN devices"
        )
