"""Executes one attention worker's StepPlan: embeddings, attention layers, LM head, sampling.

The FFN half of every layer is reached through an `FFNLink`, so this one loop serves aggregated
mode (local FFN) and AFD (remote FFN). Microbatches ping-pong: while the FFN computes layer l of
microbatch i, this worker computes layer l (or l + 1) of the next microbatch.

Prompt logprobs: a chunk that names prompt tokens to score (`prompt_logprob_targets`) also gets
the LM head on those rows, apart from the sampling rows (so asking for them never changes a
sampled token), PROMPT_LOGPROB_ROWS rows at a time to bound the [rows, V] logits.

Legend: T = tokens in a microbatch, D = hidden size, N = sequences sampled this step, V = vocab,
P = prompt rows scored this step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from afdserve.afd.ffn_link import FFNLink
from afdserve.engine.kv_cache import KVCache
from afdserve.engine.kv_tier import HostKVTier
from afdserve.engine.microbatch import split_microbatches
from afdserve.engine.penalties import TokenHistory
from afdserve.engine.sampler import sample, score_tokens
from afdserve.engine.structured import Grammars
from afdserve.model.attention import AttentionMetadata
from afdserve.model.parts import AttentionPart
from afdserve.types import ChunkPromptLogprobs, PromptLogprob, ScheduledChunk, StepPlan, StepResult

PROMPT_LOGPROB_ROWS = 256
"""Prompt rows per LM-head call when scoring prompt tokens ([256, V] float32 logits)."""


@dataclass
class _Microbatch:
    chunks: list[ScheduledChunk]
    meta: AttentionMetadata
    cos: torch.Tensor  # [T, Dh]
    sin: torch.Tensor  # [T, Dh]
    sample_rows: torch.Tensor  # [n] rows whose hidden state yields a next token
    prompt_rows: torch.Tensor  # [p] rows that score the next prompt token
    x: torch.Tensor  # [T, D] residual stream entering the current layer
    h: torch.Tensor | None = None  # [T, D] after the current layer's attention block


class AttentionRunner:
    def __init__(
        self,
        part: AttentionPart,
        kv: KVCache,
        link: FFNLink,
        num_microbatches: int = 1,
        microbatch_tokens: int | None = None,
        eos_token_ids: Iterable[int] = (),
        tokenizer_file: str | Path | None = None,
        host_tier: HostKVTier | None = None,
    ) -> None:
        self.part, self.kv, self.link = part, kv, link
        self.host_tier = host_tier
        """The KV host tier, whose copies each plan names (engine/kv_tier.py)."""
        self.num_microbatches = num_microbatches
        self.microbatch_tokens = microbatch_tokens
        """When set, the step is split into ceil(tokens / microbatch_tokens) microbatches instead."""
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        """The model's EOS ids: min_tokens masks them (with each request's stop_token_ids)."""
        self.history = TokenHistory()
        """The token history of this worker's sequences with penalties (engine/penalties.py);
        its owner drops finished sequences from it (`AttentionWorker.step`)."""
        self.grammars = Grammars(tokenizer_file, part.config.vocab_size, self.eos_token_ids)
        """The grammar state of this worker's structured sequences (engine/structured.py),
        built from the model's `tokenizer_file` at the first one; pruned like `history`."""
        self.device = part.embed_tokens.weight.device
        self.dtype = part.embed_tokens.weight.dtype

    @torch.inference_mode()
    def execute(self, plan: StepPlan, step: int) -> StepResult:
        """Run `plan` as bundle step `step` (the id every worker of the bundle shares)."""
        if plan.swap_out or plan.swap_in:
            if self.host_tier is None:
                raise RuntimeError(f"step {plan.step_id} copies KV blocks but there is no tier")
            self.host_tier.apply(self.kv, plan.step_id, plan.swap_out, plan.swap_in)
        self.history.observe(plan.chunks)
        mbs = [
            self._prepare(g) for g in split_microbatches(plan.chunks, self._microbatch_count(plan))
        ]
        self.link.begin_step(
            step, [m.meta.num_tokens for m in mbs], [[c.seq_id for c in m.chunks] for m in mbs]
        )
        num_layers = len(self.part.layers)
        for layer in range(num_layers):
            for i, mb in enumerate(mbs):
                if layer > 0:  # finish layer - 1 of this microbatch: its FFN output is due first
                    mb.x = mb.h + self.link.result(step, layer - 1, i)
                mb.h = self.part.layers[layer](
                    mb.x, mb.meta, mb.cos, mb.sin, self.kv.k[layer], self.kv.v[layer]
                )
                self.link.submit(step, layer, i, mb.h)
        for i, mb in enumerate(mbs):
            mb.x = mb.h + self.link.result(step, num_layers - 1, i)
        prompt_logprobs = self._prompt_logprobs(mbs)
        chunks = [c for mb in mbs for c in mb.chunks if c.sample]
        if not chunks:
            return StepResult(plan.step_id, (), prompt_logprobs)
        hidden = torch.cat([mb.x[mb.sample_rows] for mb in mbs])  # [N, D]
        logits = self.part.logits(hidden)  # [N, V]
        sampled = sample(logits, chunks, self.history, self.eos_token_ids, self.grammars)
        return StepResult(plan.step_id, tuple(sampled), prompt_logprobs)

    def _prompt_logprobs(self, mbs: list[_Microbatch]) -> tuple[ChunkPromptLogprobs, ...]:
        """Each scoring chunk's prompt tokens' logprobs, ranks and top alternatives."""
        chunks = [c for mb in mbs for c in mb.chunks if c.prompt_logprob_targets]
        if not chunks:
            return ()
        hidden = torch.cat([mb.x[mb.prompt_rows] for mb in mbs])  # [P, D]
        targets = torch.tensor(
            [t for c in chunks for t in c.prompt_logprob_targets], device=self.device
        )  # [P]
        k = max(c.params.prompt_logprobs or 0 for c in chunks)
        chosen: list[float] = []
        ranks: list[int] = []
        top_ids: list[list[int]] = []
        top_vals: list[list[float]] = []
        for i in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            rows = slice(i, i + PROMPT_LOGPROB_ROWS)
            lps, rks, ids, vals = score_tokens(self.part.logits(hidden[rows]), targets[rows], k)
            chosen += lps
            ranks += rks
            top_ids += ids
            top_vals += vals
        out, row = [], 0
        for c in chunks:
            want = c.params.prompt_logprobs or 0
            entries = []
            for t in c.prompt_logprob_targets:
                alts = tuple(zip(top_ids[row][:want], top_vals[row][:want], strict=True))
                entries.append(PromptLogprob(t, chosen[row], ranks[row], alts))
                row += 1
            out.append(ChunkPromptLogprobs(c.seq_id, tuple(entries)))
        return tuple(out)

    def _microbatch_count(self, plan: StepPlan) -> int:
        if self.microbatch_tokens:
            return max(1, -(-plan.num_tokens // self.microbatch_tokens))
        return self.num_microbatches

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Microbatch:
        meta = AttentionMetadata.build(
            [c.start_pos for c in chunks],
            [c.num_tokens for c in chunks],
            [c.block_table for c in chunks],
            self.kv.block_size,
            self.device,
        )
        ids = torch.tensor(
            [t for c in chunks for t in c.token_ids], dtype=torch.int64, device=self.device
        )
        ends, rows, prompt_rows = 0, [], []
        for c in chunks:
            first = ends + c.prompt_logprob_start
            prompt_rows.extend(range(first, first + len(c.prompt_logprob_targets)))
            ends += c.num_tokens
            if c.sample:
                rows.append(ends - 1)
        cos, sin = self.part.rope(meta, self.dtype)
        return _Microbatch(
            chunks,
            meta,
            cos,
            sin,
            torch.tensor(rows, dtype=torch.int64, device=self.device),
            torch.tensor(prompt_rows, dtype=torch.int64, device=self.device),
            x=self.part.embed(ids),
        )
