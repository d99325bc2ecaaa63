"""`SimRun`: the raw outcome of simulating one unit (a bundle or one instance), as arrays.

Kept raw so that the runs of several units (aggregated replicas, bundles, prefill and decode
pools) can be merged before metrics are taken (`afdserve.sim.metrics.summarize`). Times in ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from afdserve.sim.config import BundleConfig
from afdserve.sim.pipeline import StageTimes


@dataclass
class SimRun:
    config: BundleConfig
    num_layers: int
    # ---- per step [S] (attention_busy [S, r]) ----
    step_start: np.ndarray
    step_duration: np.ndarray
    attention_busy: np.ndarray
    """[S, r] ms each attention worker computes (all layers plus its per-step work)."""
    ffn_busy: np.ndarray
    link_busy: np.ndarray
    tokens_out: np.ndarray
    """[S] tokens generated (first tokens included)."""
    itl_tokens: np.ndarray
    """[S] generated tokens that follow an earlier token of the same request (ITL samples)."""
    decode_slots: np.ndarray
    """[S] slots decoding."""
    decode_context: np.ndarray
    """[S] context tokens those slots read (sum of prompt + generated)."""
    prefill_tokens: np.ndarray
    """[S] prefill-chunk tokens computed."""
    # ---- per request [N] ----
    arrival: np.ndarray
    first_token: np.ndarray
    """Time of the first token (nan: not reached in the run)."""
    finish: np.ndarray
    """Time of the last token (nan: not finished in the run)."""
    prompt_len: np.ndarray
    output_len: np.ndarray
    warm: np.ndarray
    """Requests already running at time 0 (stationary start): no latency samples."""
    wall_s: float = 0.0
    """Wall-clock seconds the simulation took."""
    timeline: list[StageTimes] = field(default_factory=list)
    """Stage times of the first steps, when asked for (timeline plots)."""
    extra_itl: tuple[np.ndarray, np.ndarray] | None = None
    """Extra (values, weights) ITL samples, e.g. the gap a prefill/decode split adds."""
    label: str = ""

    @property
    def num_steps(self) -> int:
        return int(self.step_duration.size)

    @property
    def span_ms(self) -> float:
        """From the first step's start to the last step's end (0 without steps)."""
        if self.num_steps == 0:
            return 0.0
        return float(self.step_start[-1] + self.step_duration[-1] - self.step_start[0])

    @property
    def sim_time_ms(self) -> float:
        """Simulated time covered, from 0 to the end of the last step."""
        if self.num_steps == 0:
            return 0.0
        return float(self.step_start[-1] + self.step_duration[-1])
