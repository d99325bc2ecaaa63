"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

One scheduler per attention worker owns that worker's request queue and KV block pool. Each
step is a strict pair, `plan = schedule()` then `events = update(plan, result)`:

* `schedule()` spends a token budget (`max_num_batched_tokens`). Running sequences go first, in
  admission order: a decoding sequence takes 1 token, a sequence part-way through its prefill
  takes its next chunk. Then waiting requests are admitted first come, first served while the
  budget, `max_num_seqs` and free KV blocks allow; a prompt larger than the remaining budget is
  chunked. A chunk asks for a sample only when it reaches the sequence's newest token. KV
  blocks for every chunk are allocated before the plan is handed out.
* When a running sequence needs a block and none is free, the most recently admitted running
  sequence is preempted: its blocks are freed and it goes back to the front of the waiting
  queue with nothing computed. On resumption its prompt *and* its generated tokens are
  re-fed as one prefill, so its outputs are kept and sampling continues at the same
  output_index (seeded sampling therefore gives the same tokens as without preemption). No
  waiting request is admitted in a step that preempted.
* `update()` advances the computed counts, appends sampled tokens, applies the stop rules and
  frees the blocks of finished sequences. A request's first token event also carries its
  queue time (taken in -> first scheduled) and prefill time (first scheduled -> first token),
  on the scheduler's `clock`, for the server's metrics.
* Prefix caching (`CacheConfig.enable_prefix_caching`; engine/prefix_cache.py): a block whose
  tokens are all computed is entered in the pool's cache under its chained hash once the step
  that wrote it is updated, and stays there after its sequence ends or is preempted, until an
  allocation evicts it (least recently released first). A waiting sequence is admitted with
  the longest cached run of its leading full blocks (references taken, so shared blocks are
  never written: they are full) and its prefill starts after them. Never reused: the last
  known token (its logits are the next sample), prompt positions whose logprobs are still
  owed, and, for a sequence with penalties, prompt tokens its runner's history has not seen
  (the runner learns the prompt from the chunks fed). Hits are counted in tokens
  (`prefix_cache_queries`, `prefix_cache_hits`); cached tokens count as prompt tokens, not as
  recomputed ones, so those counters read the same with the cache on or off.
* Prompt logprobs (`SamplingParams.prompt_logprobs`): each chunk names the prompt tokens its rows
  score (`prompt_logprob_targets`); `update()` gathers the runner's answers on the sequence and
  sends all of them once, on its first token event. A preempted sequence keeps what it has, so
  its recompute scores only the positions still missing, and none once they were sent.

Termination: the oldest running sequence always gets at least one token per step and can
preempt every other one, and any single sequence fits the cache alone (the usable context is
capped at the cache capacity), so the scheduler never deadlocks or livelocks.

Stop rules, checked after each sampled token, in this order:
  1. EOS (any of the model's `eos_token_ids`; skipped with `ignore_eos`) -> "stop";
  2. a token in `params.stop_token_ids` -> "stop" (the token is kept and reported);
     (1 and 2 only once `params.min_tokens` tokens were generated, as in vLLM; the sampler
     masks those tokens until then, so this only matters where nothing else was left)
  3. the sampler says so (`SampledToken.stop`: a structured output's grammar is complete)
     -> "stop";
  4. `max_tokens` generated -> "length";
  5. prompt + output reached `max_model_len` -> "length".
`max_tokens` larger than the context allows is not an error: the request just ends with
"length" when the context fills. A prompt longer than the context is a `UserInputError`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from afdserve.engine.config import CacheConfig, SchedulerConfig
from afdserve.engine.prefix_cache import BlockPool, HostHit, block_hashes
from afdserve.engine.sequence import Sequence, SequenceStatus
from afdserve.errors import UserInputError
from afdserve.types import (
    FinishReason,
    Request,
    SampledToken,
    ScheduledChunk,
    StepPlan,
    StepResult,
    TokenEvent,
)


@dataclass
class SchedulerCounters:
    """Monotonic counters for metrics (Prometheus counters read these)."""

    requests_added: int = 0
    requests_finished: int = 0
    """Finished by stop or length (aborts are counted apart)."""
    requests_aborted: int = 0
    prompt_tokens: int = 0
    """Prompt tokens prefilled for the first time."""
    recomputed_tokens: int = 0
    """Tokens prefilled again after a preemption (prompt and earlier outputs)."""
    generation_tokens: int = 0
    """Tokens sampled."""
    preemptions: int = 0
    steps: int = 0
    """Non-empty steps completed (updated)."""
    prefix_cache_queries: int = 0
    """Tokens of the sequences admitted with the prefix cache on (vLLM's prefix_cache_queries)."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV came from the cache instead of being computed."""
    kv_host_blocks_out: int = 0
    """KV host tier: cached blocks copied out of the device when it evicted them..."""
    kv_host_blocks_in: int = 0
    """...and blocks copied back for a hit or a resume (their tokens are prefix-cache hits)."""


@dataclass(frozen=True)
class SchedulerLoad:
    """Outstanding work of one attention worker, for the router (lower is less loaded)."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    queued_prompt_tokens: int
    """Known tokens not yet in the KV cache: waiting prompts, preempted sequences to recompute,
    the unfinished parts of chunked prefills, and 1 per decoding sequence."""
    remaining_output_tokens: int
    """Upper bound on tokens still to generate (max_tokens and context left, summed)."""

    @property
    def score(self) -> int:
        """Tokens of KV held plus tokens queued for prefill: the router's default key."""
        return self.kv_blocks_used * self.block_size + self.queued_prompt_tokens


class Scheduler:
    """Per-attention-worker scheduler; see the module docstring for the policy."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        eos_token_ids: Iterable[int] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` times what the metrics report (queue and prefill time of each request)."""
        if not isinstance(scheduler_config, SchedulerConfig):
            raise TypeError(f"scheduler_config must be a SchedulerConfig, got {scheduler_config!r}")
        if not isinstance(cache_config, CacheConfig):
            raise TypeError(f"cache_config must be a CacheConfig, got {cache_config!r}")
        self.config = scheduler_config
        self.cache_config = cache_config
        self.eos_token_ids: frozenset[int] = frozenset(int(t) for t in eos_token_ids)
        self._clock = clock
        self.allocator = BlockPool(
            cache_config.num_blocks,
            caching=cache_config.enable_prefix_caching,
            num_host_blocks=cache_config.num_host_blocks,
        )
        self.counters = SchedulerCounters()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # admission order: the last is preempted first
        self._by_request: dict[str, Sequence] = {}
        self._by_seq: dict[int, Sequence] = {}
        self._next_seq_id = 0
        self._next_step_id = 0
        self._in_flight: StepPlan | None = None

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """Usable context per request: the model's, capped at what the KV cache can hold, so
        that any one sequence always fits the cache alone."""
        return min(self.config.max_model_len, self.cache_config.capacity_tokens)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    # ---- inspection (metrics, tests): read-only views ---------------------------------------

    @property
    def running(self) -> tuple[Sequence, ...]:
        """Running sequences in admission order (the last is preempted first)."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        """Waiting sequences in the order they will be admitted."""
        return tuple(self._waiting)

    def sequence_by_seq_id(self, seq_id: int) -> Sequence | None:
        """The live sequence with this id (None once it finished or was aborted)."""
        return self._by_seq.get(seq_id)

    @property
    def live_seq_ids(self) -> frozenset[int]:
        """Ids of every sequence the scheduler tracks (running or waiting)."""
        return frozenset(self._by_seq)

    @property
    def kv_usage(self) -> float:
        """Fraction of usable KV blocks held by sequences, in [0, 1]."""
        return self.allocator.usage

    def load(self) -> SchedulerLoad:
        seqs = [*self._running, *self._waiting]
        return SchedulerLoad(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_total=self.allocator.num_usable,
            block_size=self.cache_config.block_size,
            queued_prompt_tokens=sum(s.num_uncomputed_tokens for s in seqs),
            remaining_output_tokens=sum(self._remaining_outputs(s) for s in seqs),
        )

    def sequence(self, request_id: str) -> Sequence | None:
        """The live (waiting or running) sequence of a request, for inspection."""
        return self._by_request.get(request_id)

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, request: Request) -> int:
        """Queue a request; returns its seq_id. Raises UserInputError for a prompt that cannot
        fit the context or a request id already in this scheduler."""
        if not isinstance(request, Request):
            raise TypeError(f"expected a Request, got {type(request).__name__}")
        if request.request_id in self._by_request:
            raise UserInputError(f"duplicate request id {request.request_id!r}")
        n = len(request.prompt_token_ids) + len(request.generated)
        if n > self.max_model_len:
            if n > self.config.max_model_len:
                why = f"the model's context length (max_model_len) is {self.config.max_model_len}"
            else:
                why = (
                    f"the KV cache of this worker holds only {self.cache_config.capacity_tokens} "
                    f"tokens ({self.cache_config.num_usable_blocks} blocks of "
                    f"{self.cache_config.block_size})"
                )
            what = "prompt with what it generated" if request.generated else "prompt"
            raise UserInputError(f"request {request.request_id!r}: {what} has {n} tokens but {why}")
        seq = Sequence(seq_id=self._next_seq_id, request=request, queued_at=self._clock())
        if request.generated:  # migrated: recomputed like a preempted sequence
            seq.token_ids.extend(request.generated)
            seq.prompt_logprobs_sent = True  # they went out with its first token, elsewhere
        self._next_seq_id += 1
        self._waiting.append(seq)
        self._by_request[request.request_id] = seq
        self._by_seq[seq.seq_id] = seq
        self.counters.requests_added += 1
        return seq.seq_id

    def abort_request(self, request_id: str) -> bool:
        """Drop a request now and free its blocks; False when it is unknown or already done.

        Safe between `schedule()` and `update()`: the aborted sequence's share of the in-flight
        step is ignored by `update()`. (Its blocks may be handed out again by the next
        `schedule()`, which only happens after that `update()`.)
        """
        seq = self._by_request.get(request_id)
        if seq is None:
            return False
        if seq.status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
        else:
            self._running.remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return True

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan the next step. A non-empty plan must be answered by `update()` before the next
        `schedule()`; an empty one (nothing to run) needs none."""
        if self._in_flight is not None:
            raise RuntimeError(
                f"schedule() called while step {self._in_flight.step_id} awaits update()"
            )
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[int] = []

        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            n = self._chunk_len(seq, budget)
            if not self._reserve_blocks(seq, n, preempted):
                break  # seq itself was preempted: it was the last running sequence
            chunks.append(self._make_chunk(seq, n))
            budget -= n
            i += 1

        if not preempted:
            while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
                seq = self._waiting[0]  # holds no blocks and has nothing computed
                hit = self._cached_prefix(seq)
                on_device = [b for b in hit if not isinstance(b, HostHit)]
                cached = len(hit) * self.cache_config.block_size
                n = self._chunk_len(seq, budget, cached)
                need = self.cache_config.blocks_for(cached + n) - len(on_device)
                held = self.allocator.num_evictable_of(on_device)
                if not self.allocator.can_allocate(need + held):
                    break  # FCFS: nobody overtakes the head of the queue
                self._waiting.popleft()
                if self.allocator.caching:
                    self._take_cached(seq, hit)
                seq.block_table.extend(self.allocator.allocate(need - (len(hit) - len(on_device))))
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_at is None:
                    seq.first_scheduled_at = self._clock()
                self._running.append(seq)
                chunks.append(self._make_chunk(seq, n))
                budget -= n

        swap_out, swap_in = self.allocator.take_plan_copies()
        if (swap_out or swap_in) and not chunks:
            raise RuntimeError("a plan with KV copies but nothing to run")
        self.counters.kv_host_blocks_out += len(swap_out)
        self.counters.kv_host_blocks_in += len(swap_in)
        plan = StepPlan(
            step_id=self._next_step_id,
            chunks=tuple(chunks),
            preempted=tuple(preempted),
            swap_out=swap_out,
            swap_in=swap_in,
        )
        self._next_step_id += 1
        if chunks:  # an empty plan needs no update() (one is accepted and does nothing)
            self._in_flight = plan
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[TokenEvent]:
        """Apply the runner's result for `plan`; returns one event per sampled token.

        Raises ValueError (and changes nothing) when the result does not answer the plan: a
        missing or extra sampled token, or a mismatched step id.
        """
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for step {plan.step_id}")
        if plan.is_empty and not result.sampled:
            return []
        if self._in_flight is None or plan is not self._in_flight:
            raise ValueError(f"update() for step {plan.step_id}, which is not the step in flight")
        sampled: dict[int, SampledToken] = {}
        for tok in result.sampled:
            if tok.seq_id in sampled:
                raise ValueError(f"step {plan.step_id}: two tokens for sequence {tok.seq_id}")
            sampled[tok.seq_id] = tok
        prompt_lps = {p.seq_id: p.entries for p in result.prompt_logprobs}
        scored = {c.seq_id: c.prompt_logprob_targets for c in plan.chunks}
        for seq_id, entries in prompt_lps.items():
            if tuple(e.token_id for e in entries) != scored.get(seq_id):
                raise ValueError(
                    f"step {plan.step_id}: prompt logprobs of sequence {seq_id} do not match "
                    "the prompt tokens the plan asked to score"
                )
        if {k for k, v in scored.items() if v} != prompt_lps.keys():
            raise ValueError(f"step {plan.step_id}: prompt logprobs missing or unexpected")
        wanted = {c.seq_id for c in plan.chunks if c.sample}
        if wanted != sampled.keys():
            missing = sorted(wanted - sampled.keys())
            extra = sorted(sampled.keys() - wanted)
            raise ValueError(
                f"step {plan.step_id}: sampled tokens do not match the plan "
                f"(missing for sequences {missing}, unexpected for {extra})"
            )
        self._in_flight = None
        self.counters.steps += 1

        events: list[TokenEvent] = []
        for chunk in plan.chunks:
            seq = self._by_seq.get(chunk.seq_id)
            if seq is None:
                continue  # aborted while the step was in flight
            self._advance(seq, chunk)
            self._cache_full_blocks(seq)
            seq.prompt_logprobs.extend(prompt_lps.get(chunk.seq_id, ()))
            if not chunk.sample:
                continue
            prompt_logprobs = None
            if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                prompt_logprobs = tuple(seq.prompt_logprobs)  # all P - 1 of them by now
                seq.prompt_logprobs_sent = True
                seq.prompt_logprobs = []
            tok = sampled[chunk.seq_id]
            queue_s = prefill_s = None
            if seq.output_index == 0:  # the request's first token: report its queue and prefill
                now = self._clock()
                scheduled = seq.first_scheduled_at if seq.first_scheduled_at is not None else now
                queue_s, prefill_s = scheduled - seq.queued_at, now - scheduled
            seq.append_token(tok.token_id)
            self.counters.generation_tokens += 1
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                self._running.remove(seq)
                self._finish(seq, reason)
            events.append(
                TokenEvent(
                    request_id=seq.request_id,
                    token_id=tok.token_id,
                    finished=reason is not None,
                    finish_reason=reason,
                    logprob=tok.logprob,
                    top_logprobs=tok.top_logprobs,
                    queue_s=queue_s,
                    prefill_s=prefill_s,
                    prompt_logprobs=prompt_logprobs,
                )
            )
        return events

    # ---- internals -------------------------------------------------------------------------

    def _chunk_len(self, seq: Sequence, budget: int, computed: int | None = None) -> int:
        """Tokens of `seq` to feed this step (from `computed`, default its computed count)."""
        start = seq.num_computed_tokens if computed is None else computed
        n = min(seq.num_tokens - start, budget)
        cap = self.config.long_prefill_token_threshold
        if cap and n > 1:
            n = min(n, cap)
        return n

    def _reserve_blocks(self, seq: Sequence, n: int, preempted: list[int]) -> bool:
        """Make `seq`'s block table cover n more tokens, preempting the most recently admitted
        running sequences while blocks are short. False when `seq` itself had to go."""
        need = self.cache_config.blocks_for(seq.num_computed_tokens + n) - len(seq.block_table)
        while not self.allocator.can_allocate(need):
            victim = self._running.pop()
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                if not self._running:  # cannot happen: one sequence always fits the cache alone
                    raise RuntimeError(
                        f"sequence {seq.seq_id} needs {need} more KV blocks with the cache to itself"
                    )
                return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    # ---- prefix cache ----------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[int | HostHit]:
        """The cached blocks a waiting `seq` may start with, on the device or in the host
        tier (no reference taken yet)."""
        if not self.allocator.caching:
            return []
        bs = self.cache_config.block_size
        limit = seq.num_tokens - 1  # the last token is fed: its logits give the next sample
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            limit = min(limit, len(seq.prompt_logprobs))  # feed from the next position to score
        if seq.params.uses_penalties and not seq.request.generated:
            limit = min(limit, seq.max_computed_tokens)  # the history saw only these fed
        if limit < bs:
            return []
        seq.block_hashes = block_hashes(seq.token_ids, bs, seq.block_hashes)
        return self.allocator.lookup_tiers(seq.block_hashes[: limit // bs])

    def _take_cached(self, seq: Sequence, hit: list[int | HostHit]) -> None:
        """Admit `seq` with the cached blocks `hit` as its first blocks, computed (those in
        the host tier are copied back at the step's start, before its chunks run)."""
        seq.block_table.extend(self.allocator.take(hit))
        seq.num_cached_blocks = len(hit)
        cached = len(hit) * self.cache_config.block_size
        self.counters.prefix_cache_queries += seq.num_tokens
        self.counters.prefix_cache_hits += cached
        p, done = seq.num_prompt_tokens, seq.max_computed_tokens
        self.counters.prompt_tokens += max(0, min(cached, p) - min(done, p))
        seq.num_computed_tokens = cached
        seq.max_computed_tokens = max(done, cached)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks `seq` has just filled (their KV is written) to the cache."""
        if not self.allocator.caching:
            return
        bs = self.cache_config.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_cached_blocks:
            return
        seq.block_hashes = block_hashes(seq.token_ids[: full * bs], bs, seq.block_hashes)
        for i in range(seq.num_cached_blocks, full):
            self.allocator.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def _release(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks, its tail first: an eviction then takes a sequence's last
        blocks before its first, which are the ones other requests are likelier to share."""
        self.allocator.free(reversed(seq.block_table))
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)  # victims pop newest-first, so the oldest ends up in front
        self.counters.preemptions += 1

    def _make_chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        first, count = seq.prompt_logprob_range(start, n)
        targets = start + first + 1  # the position of the first prompt token scored
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids[start : start + n]),
            start_pos=start,
            block_table=tuple(seq.block_table),
            sample=start + n == seq.num_tokens,
            params=seq.params,
            sampling_seed=seq.request.sampling_seed,
            output_index=seq.output_index,
            prompt_logprob_start=first,
            prompt_logprob_targets=tuple(seq.token_ids[targets : targets + count]),
        )

    def _advance(self, seq: Sequence, chunk: ScheduledChunk) -> None:
        if seq.num_computed_tokens != chunk.start_pos:
            raise RuntimeError(
                f"sequence {seq.seq_id}: computed {seq.num_computed_tokens} tokens but the chunk "
                f"starts at {chunk.start_pos}"
            )
        end = chunk.context_len
        first_time = max(0, end - seq.max_computed_tokens)
        recomputed = chunk.num_tokens - first_time
        # first-time tokens inside the original prompt are prompt tokens; later ones are the
        # just-sampled outputs being fed back, which are counted as generation tokens already
        prompt_new = max(
            0, min(end, seq.num_prompt_tokens) - min(seq.max_computed_tokens, seq.num_prompt_tokens)
        )
        self.counters.prompt_tokens += prompt_new
        self.counters.recomputed_tokens += recomputed
        seq.num_computed_tokens = end
        seq.max_computed_tokens = max(seq.max_computed_tokens, end)

    def _stop_reason(self, seq: Sequence, tok: SampledToken) -> FinishReason | None:
        params = seq.params
        token_id = tok.token_id
        may_stop = seq.output_index >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if may_stop and token_id in params.stop_token_ids:
            return FinishReason.STOP
        if tok.stop:  # the structured output's grammar is complete
            return FinishReason.STOP
        if seq.output_index >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _remaining_outputs(self, seq: Sequence) -> int:
        by_tokens = seq.params.max_tokens - seq.output_index
        by_context = max(1, self.max_model_len - seq.num_tokens)
        return min(by_tokens, by_context)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._by_request[seq.request_id]
        del self._by_seq[seq.seq_id]
        if reason is FinishReason.ABORT:
            self.counters.requests_aborted += 1
        else:
            self.counters.requests_finished += 1
