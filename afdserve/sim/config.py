"""`BundleConfig`: the shape of one simulated serving unit (frozen, validated).

One unit is either an AFD bundle (r attention workers sharing one FFN worker, synchronised every
step) or, with `pipeline="colocated"`, one aggregated instance that runs attention and FFN itself.
Serving deployments of several units (aggregated replicas, several bundles, prefill/decode pools)
are built from these in `afdserve.sim.deployments`.
"""

from __future__ import annotations

from dataclasses import dataclass

from afdserve.errors import UserInputError

PIPELINES: tuple[str, ...] = ("microbatch", "ideal", "colocated", "serial")
PREFILL_MODES: tuple[str, ...] = ("chunked", "none")


@dataclass(frozen=True)
class BundleConfig:
    attention_workers: int = 1
    """r: attention workers of the bundle (1 for a colocated instance)."""
    slots: int = 64
    """B: most requests running on one attention worker at once (max_num_seqs)."""
    microbatches: int = 1
    """M: microbatches each worker splits a step into (balanced by tokens, like the runtime)."""
    pipeline: str = "microbatch"
    """How a step's layers are timed:
    - `microbatch`: exactly, per layer and microbatch, with attention, A->F link, FFN and F->A
      link each a server working in order (the runtime's loop); M = 1 is the unpipelined sum;
    - `ideal`: the planner's assumption, L * max(slowest attention worker, FFN, link) a step
      (perfect overlap at no extra cost, M ignored);
    - `colocated`: one instance runs attention then FFN of each microbatch (aggregated serving);
    - `serial`: an AFD bundle whose workers share one executor (the in-process runtime: threads
      of one interpreter on the same cores), so every job runs after the previous one."""
    prefill: str = "chunked"
    """`chunked`: prompts are prefilled in chunks within `token_budget`, through the same stages,
    and the first token comes at the end of the last chunk; `none`: the prompt is in the KV cache
    on admission and the request decodes `output_len` steps (the planner's theory)."""
    token_budget: int = 2048
    """Tokens one worker computes in one step: decode tokens first, then prefill chunks
    (max_num_batched_tokens)."""
    kv_capacity_tokens: int | None = None
    """KV cache of one attention worker in tokens; admission reserves prompt + output tokens.
    None: unbounded."""

    def __post_init__(self) -> None:
        for name in ("attention_workers", "slots", "microbatches", "token_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {v!r}")
        if self.pipeline not in PIPELINES:
            raise UserInputError(
                f"pipeline must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}"
            )
        if self.prefill not in PREFILL_MODES:
            raise UserInputError(
                f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}"
            )
        if self.pipeline == "colocated" and self.attention_workers != 1:
            raise UserInputError(
                "a colocated (aggregated) instance has one worker; simulate replicas as "
                "separate instances"
            )
        if self.microbatches > self.slots:
            raise UserInputError(
                f"microbatches ({self.microbatches}) cannot exceed slots ({self.slots})"
            )
        kv = self.kv_capacity_tokens
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            raise UserInputError(f"kv_capacity_tokens must be an integer >= 1, got {kv!r}")

    @property
    def num_slots(self) -> int:
        return self.attention_workers * self.slots

    @property
    def is_afd(self) -> bool:
        return self.pipeline != "colocated"

    @property
    def instances(self) -> int:
        """Instances the unit occupies: r + 1 for a bundle, 1 for a colocated instance."""
        return self.attention_workers + 1 if self.is_afd else 1

    @property
    def groups(self) -> int:
        """Microbatches the step arrays are kept in (1 for the ideal pipeline)."""
        return 1 if self.pipeline == "ideal" else self.microbatches
